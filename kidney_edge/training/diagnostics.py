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
# A run "has not learned the classes" while its best validation macro-F1 stays within the first
# LEARNED_SHARE of the way from chance (1/C) to perfect: 0.5 for 4 classes, 0.67 for 2. It
# "memorised" them when its last training accuracy (under augmentation) is FITTED_ACCURACY or
# more. On the look-alike renderer the defaults fit 80-99% of the training slices and peaked at
# validation 0.28-0.48, test 0.19-0.31; on the demo phantom validation reaches 0.97
# (benchmarks/results/recipe.md).
FITTED_ACCURACY = 0.8
LEARNED_SHARE = 1 / 3
GUIDE = "docs/training.md#what-the-model-can-and-cannot-learn-hard-findings"


def run_warnings(
    history: Sequence[dict[str, Any]],
    phase_epochs: dict[str, int],
    val_labels: np.ndarray,
    class_names: Sequence[str],
) -> list[str]:
    """Warnings for: a phase still climbing at its last epoch, a class with few validation
    images, a head phase that stayed near chance, and a run that has not learned the classes."""
    warnings = [*_still_rising(history, phase_epochs), *_small_val_classes(val_labels, class_names)]
    not_learned = _not_learned(history, len(class_names))
    head = [row["val_macro_f1"] for row in history if row["phase"] == "head"]
    chance = CHANCE_FACTOR / len(class_names)
    if not_learned:
        warnings.append(not_learned)  # it says what to do instead of "more fine-tuning"
    elif head and max(head) < chance:
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


def _not_learned(history: Sequence[dict[str, Any]], num_classes: int) -> str | None:
    """The warning for a run whose best validation macro-F1 stays near chance, or None.

    When it also fits its training images, more epochs or unfrozen blocks only fit them further;
    what helps is what lets the classes generalise: more patients, and findings the model's view
    (region and input size) shows large enough.
    """
    if not history:
        return None
    best = max(float(row["val_macro_f1"]) for row in history)
    chance = 1 / num_classes
    learned = chance + LEARNED_SHARE * (1 - chance)
    if best >= learned:
        return None
    seen = (
        f"the model has not learned the classes: its best validation macro-F1 is {best:.3f} (chance is "
        f"{chance:.3f}; below {learned:.3f} is not learned)"
    )
    fitted = float(history[-1].get("train_accuracy", 0.0))
    if fitted >= FITTED_ACCURACY:
        seen += (
            f", while it fits {fitted:.0%} of its training images: it memorised them. More epochs or "
            "unfrozen blocks will not help"
        )
    return (
        f"{seen}; more patients per class, or findings larger than a few pixels in the model's view "
        f"(--region kidneys, --image-size), will ({GUIDE})"
    )
