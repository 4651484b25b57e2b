"""Honest warnings about a finished run, from its history and its validation split.

Each warning is one sentence that says what was seen and what to do; ``train`` prints them and
records them in ``metrics.json`` and the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MIN_VAL_PER_CLASS = 10  # below this, one image moves a class's validation recall by > 10 points
# Head-phase validation macro-F1 below CHANCE_FACTOR / n_classes counts as "near chance": a
# linear probe that cannot separate the classes on ImageNet features (docs/architecture.md measured 0.34
# on a look-alike set of 4 classes, where fine-tuning then had to do all the work).
CHANCE_FACTOR = 1.5


def run_warnings(
    history: Sequence[dict[str, Any]],
    phase_epochs: dict[str, int],
    val_labels: np.ndarray,
    class_names: Sequence[str],
) -> list[str]:
    """Warnings for: a phase still climbing at its last epoch, a class with few validation
    images, and a head phase that stayed near chance."""
    warnings = [*_still_rising(history, phase_epochs), *_small_val_classes(val_labels, class_names)]
    head = [row["val_macro_f1"] for row in history if row["phase"] == "head"]
    chance = CHANCE_FACTOR / len(class_names)
    if head and max(head) < chance:
        warnings.append(
            f"the head phase (frozen ImageNet features) reached only validation macro-F1 {max(head):.3f} "
            f"(near chance, < {chance:.3f}): the classes are not separable without fine-tuning; "
            "give fine-tuning more epochs or unfreeze more blocks"
        )
    return warnings


def _still_rising(history: Sequence[dict[str, Any]], phase_epochs: dict[str, int]) -> list[str]:
    warnings = []
    for phase, epochs in phase_epochs.items():
        scores = [row["val_macro_f1"] for row in history if row["phase"] == phase]
        if len(scores) < 2 or len(scores) < epochs:
            continue  # not run, or stopped early: it had stopped climbing
        if scores[-1] > max(scores[:-1]):
            warnings.append(
                f"validation macro-F1 was still rising at the last {phase} epoch "
                f"({scores[-2]:.3f} -> {scores[-1]:.3f}): more --epochs-{phase} would likely help"
            )
    return warnings


def _small_val_classes(val_labels: np.ndarray, class_names: Sequence[str]) -> list[str]:
    counts = np.bincount(np.asarray(val_labels, dtype=np.int64), minlength=len(class_names))
    small = [f"{name} {int(n)}" for name, n in zip(class_names, counts, strict=True) if n < MIN_VAL_PER_CLASS]
    if not small:
        return []
    return [
        f"classes with fewer than {MIN_VAL_PER_CLASS} validation images ({', '.join(small)}): early "
        "stopping, calibration and the tumor threshold rest on a handful of images; add data"
    ]
