"""The INT8 gate: does the INT8 file decide like its fp32 original, on the evidence available?

Two kinds of evidence, both recorded in ``parity.json``:

- **label-free agreement** on every image the export can see (test, val, train, calibration,
  deduplicated by path; capped at :attr:`Int8GateConfig.max_images` by a seeded sample): the
  share of images whose argmax and whose decision under the spec's rule are the same in INT8
  and fp32, and the max/mean |p_int8 - p_fp32|. No labels needed, so it does not shrink with
  the test split: a 37-image test split measures a 1-point drop as "one image", while
  agreement on 1,600 images resolves 0.06 points.
- **labelled deltas** on the test split (INT8 - fp32 macro-F1, positive-class recall and
  accuracy, under argmax and under the rule) with **paired bootstrap** confidence intervals:
  both models are scored on the same resampled images, so the interval measures the change,
  not the split's own sampling noise of each score.

The gate passes when both agreements are >= ``min_agreement`` and no labelled drop (fp32 -
INT8) is shown to exceed ``max_drop``: the lower end of its interval stays within it. Agreement
is what proves INT8 faithful; the labels can only veto, on a loss that is both over budget and
real. The other way round (the drop's upper end within budget) would judge the split, not the
file: on the demo's 180-image test split one near-tie Tumor image that flips puts the upper end
of the Tumor-recall drop at 9.09 points while 99.33% of all decisions agree
(benchmarks/results/int8.md, variants on the trained demo). The criterion closest to (or
furthest past) its limit is the **deciding** one, stated in one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import InputError
from kidney_edge.spec import ModelSpec

log = logging.getLogger(__name__)

DECISIONS = ("argmax", "rule")  # the gate scores both; predict writes the rule's labels
GATED_SCORES = ("macro_f1", "positive_recall")  # a drop in either can fail the gate
SCORES = ("accuracy", "macro_f1", "positive_recall")
# INT8 may change at most 1 decision in 100 against fp32 on the images the export can see.
DEFAULT_MIN_AGREEMENT = 0.99
# The INT8 file is refused when its macro-F1 or positive-class recall is shown (at the gate's
# confidence) to lose more than 1 point against fp32.
DEFAULT_MAX_DROP = 0.01
# 2,000 images resolve agreement to 0.05 points (one image); at 99% its standard error is 0.22
# points. Each repair candidate is scored on all of them, so the cap bounds the export's time on
# a big dataset (12,446 Kaggle images) to that of a mid-sized one: the INT8 stage's seconds per
# model are in benchmarks/results/int8.md (exports table).
DEFAULT_MAX_IMAGES = 2000


@dataclass(frozen=True)
class Int8GateConfig:
    """When an INT8 file is faithful enough to ship; messages name the CLI flags."""

    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_drop: float = DEFAULT_MAX_DROP
    confidence: float = 0.95  # two-sided interval of each labelled change
    resamples: int = 2000
    max_images: int = DEFAULT_MAX_IMAGES
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise InputError(f"--int8-min-agreement must be in [0, 1] (0.99 = 99%), got {self.min_agreement}")
        if not 0.0 <= self.max_drop <= 1.0:
            raise InputError(f"--max-int8-drop must be in [0, 1] (0.01 = 1 point), got {self.max_drop}")
        if not 0.5 <= self.confidence < 1.0:
            raise InputError(f"gate confidence must be in [0.5, 1), got {self.confidence}")
        if not 100 <= self.resamples <= 100_000:
            raise InputError(f"bootstrap resamples must be in 100..100000, got {self.resamples}")
        if self.max_images < 1:
            raise InputError(f"--int8-gate-images must be >= 1, got {self.max_images}")


# --------------------------------------------------------------------------- the images


@dataclass(frozen=True)
class GateImages:
    """The images the gate scores: the labelled ones first (``labels`` aligns with
    ``paths[:len(labels)]``), then the unlabelled ones."""

    paths: list[Path]
    labels: np.ndarray | None  # (L,) class indices; None without a labelled split
    available: int  # distinct images the export could see
    rule: str  # how the sample was drawn, for parity.json

    @property
    def n_labelled(self) -> int:
        return 0 if self.labels is None else len(self.labels)


def gate_images(
    labelled: Sequence[Path],
    labels: np.ndarray | None,
    others: Sequence[Path],
    max_images: int,
    seed: int,
) -> GateImages:
    """The labelled (test) images, then the ``others`` (val, train, calibration), deduplicated by
    absolute path, capped at ``max_images`` by a seeded shuffle: every test image while they fit,
    the others filling the rest. The same inputs and seed always give the same sample."""
    from kidney_edge.export.selection import shuffled_paths

    keys: dict[str, int] = {}
    test: list[tuple[Path, int | None]] = []
    for index, path in enumerate(labelled):
        key = os.path.abspath(path)
        if key not in keys:
            keys[key] = index
            test.append((Path(path), None if labels is None else int(labels[index])))
    rest = list(dict.fromkeys(Path(os.path.abspath(p)) for p in others if os.path.abspath(p) not in keys))
    available = len(test) + len(rest)
    test = [test[i] for i in sorted(_seeded_indices(len(test), max_images, seed))]
    rest = shuffled_paths(sorted(rest), seed)[: max_images - len(test)]
    paths = [path for path, _ in test] + rest
    label_array = None if labels is None else np.array([label for _, label in test], np.int64)
    rule = (
        f"all {available} distinct images (test, val, train, calibration; by path)"
        if len(paths) == available
        else f"{len(paths)} of {available} distinct images: the test split first, then the others in a "
        f"shuffle seeded with {seed} (first {max_images})"
    )
    return GateImages(paths, label_array, available, rule)


def _seeded_indices(n: int, k: int, seed: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return list(np.random.default_rng(seed).choice(n, size=k, replace=False))


# --------------------------------------------------------------------------- scores


def decisions(probabilities: np.ndarray, spec: ModelSpec) -> dict[str, np.ndarray]:
    """(N,) class indices of (N, C) probabilities under argmax and under the spec's rule."""
    return {"argmax": probabilities.argmax(axis=1).astype(np.int64), "rule": spec.decide(probabilities)}


def resampled_scores(
    y_true: np.ndarray, y_pred: np.ndarray, index: np.ndarray, n_classes: int, positive: int | None
) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and recall of class ``positive`` of (N,) decisions on each row of
    ``index`` (R, N) -> (R,) each; NaN where a resample has no positive image.

    Macro-F1 averages the classes present in ``y_true`` or ``y_pred`` (zero division = 0), as
    :func:`kidney_edge.metrics.macro_f1` does; one bincount builds all R confusion matrices.
    """
    n_resamples = index.shape[0]
    truth, predicted = y_true[index], y_pred[index]  # (R, N)
    cells = (np.arange(n_resamples)[:, None] * n_classes + truth) * n_classes + predicted
    confusion = np.bincount(cells.ravel(), minlength=n_resamples * n_classes**2)
    confusion = confusion.reshape(n_resamples, n_classes, n_classes)  # (R, true, predicted)
    true_positive = np.einsum("rcc->rc", confusion).astype(np.float64)
    actual, called = confusion.sum(axis=2), confusion.sum(axis=1)
    denominator = actual + called  # 2 TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denominator > 0, 2 * true_positive / denominator, np.nan)
        recall = true_positive[:, positive] / actual[:, positive] if positive is not None else None
    present = denominator > 0
    return {
        "accuracy": true_positive.sum(axis=1) / index.shape[1],
        "macro_f1": np.nansum(f1, axis=1) / np.maximum(present.sum(axis=1), 1),
        "positive_recall": np.full(n_resamples, np.nan) if recall is None else recall,
    }


def paired_bootstrap(
    y_true: np.ndarray,
    fp32: np.ndarray,
    int8: np.ndarray,
    n_classes: int,
    positive: int | None,
    config: Int8GateConfig,
) -> dict[str, dict[str, Any]]:
    """Per score: fp32, INT8, delta (INT8 - fp32) on the images themselves, and the delta's
    paired-bootstrap interval at ``config.confidence`` (both models on the same resampled
    images; numpy, seeded). ``drop_upper`` = -(lower end of the delta interval): how much INT8
    may lose; ``drop_lower`` = -(upper end): how much it surely loses, at the stated confidence."""
    n = len(y_true)
    whole = np.arange(n)[None, :]
    resample = np.random.default_rng(config.seed).integers(0, n, size=(config.resamples, n))
    point = {name: resampled_scores(y_true, pred, whole, n_classes, positive) for name, pred in (("fp32", fp32), ("int8", int8))}
    fp32_boot = resampled_scores(y_true, fp32, resample, n_classes, positive)
    int8_boot = resampled_scores(y_true, int8, resample, n_classes, positive)
    tail = (1 - config.confidence) / 2 * 100
    result: dict[str, dict[str, Any]] = {}
    for score in SCORES:
        before, after = float(point["fp32"][score][0]), float(point["int8"][score][0])
        delta = int8_boot[score] - fp32_boot[score]
        if np.isnan(before) or np.all(np.isnan(delta)):
            result[score] = {"fp32": None, "int8": None, "delta": None, "delta_ci": None, "drop_upper": None,
                             "drop_lower": None}  # fmt: skip
            continue
        low, high = (float(v) for v in np.nanpercentile(delta, [tail, 100 - tail]))
        result[score] = {"fp32": before, "int8": after, "delta": after - before,
                         "delta_ci": [low, high], "drop_upper": max(0.0, -low), "drop_lower": max(0.0, -high)}  # fmt: skip
    return result


def logit_relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    """||approx - ref|| / ||ref - per-image mean||: INT8 noise against the logit spread that decides.

    Independent of model quality, unlike accuracy: an untrained head with tiny margins flips
    decisions under the same noise that a trained one shrugs off.
    """
    spread = reference - reference.mean(axis=1, keepdims=True)
    return float(np.linalg.norm(approximation - reference) / max(np.linalg.norm(spread), 1e-12))


# --------------------------------------------------------------------------- the verdict


def judge(
    fp32: tuple[np.ndarray, np.ndarray],
    int8: tuple[np.ndarray, np.ndarray],
    images: GateImages,
    spec: ModelSpec,
    config: Int8GateConfig,
) -> dict[str, Any]:
    """The gate record of INT8 outputs against fp32 outputs, each ((N, C) logits, (N, C)
    probabilities) on ``images.paths``: agreement, probability error, labelled deltas with
    CIs, every criterion with its margin, ``passed``, ``deciding`` and ``failures``."""
    (fp32_logits, fp32_p), (int8_logits, int8_p) = fp32, int8
    before, after = decisions(fp32_p, spec), decisions(int8_p, spec)
    difference = np.abs(int8_p - fp32_p)
    agreement = {
        "n_images": len(images.paths), "available": images.available, "sample": images.rule,
        **{d: float(np.mean(before[d] == after[d])) for d in DECISIONS},
        "max_abs_diff_probabilities": float(difference.max()),
        "mean_abs_diff_probabilities": float(difference.mean()),
        "logit_relative_error": logit_relative_error(fp32_logits, int8_logits),
    }  # fmt: skip
    labelled = None
    if images.labels is not None and images.n_labelled:
        n, y = images.n_labelled, images.labels
        positive = spec.class_names.index(spec.positive_class) if spec.positive_class else None
        labelled = {"n_images": n, "confidence": config.confidence, "resamples": config.resamples, "seed": config.seed,
                    **{d: paired_bootstrap(y, before[d][:n], after[d][:n], spec.num_classes, positive, config)
                       for d in DECISIONS}}  # fmt: skip
    criteria = _criteria(agreement, labelled, config)
    failed = [c for c in criteria if not c["passed"]]
    deciding = min(criteria, key=lambda c: c["margin"])
    return {
        "passed": not failed,
        "deciding": _deciding_line(deciding, not failed, agreement["n_images"], labelled),
        "failures": [c["text"] for c in failed],
        "criteria": criteria,
        "min_agreement": config.min_agreement,
        "max_drop": config.max_drop,
        "agreement": agreement,
        "labelled": labelled,
        **_summary(agreement, labelled, spec),
    }


def _criteria(agreement: dict[str, Any], labelled: dict[str, Any] | None, config: Int8GateConfig) -> list[dict]:
    rows = []
    for decision in DECISIONS:
        value = agreement[decision]
        rows.append({"name": f"{decision} agreement", "value": value, "limit": config.min_agreement,
                     "margin": value - config.min_agreement, "passed": value >= config.min_agreement - 1e-12,
                     "text": f"{decision} agreement with fp32 {value:.2%} (need >= {config.min_agreement:.2%} "
                             f"on {agreement['n_images']} images)"})  # fmt: skip
    for decision in DECISIONS if labelled else ():
        for score in GATED_SCORES:
            figures = labelled[decision][score]
            if figures["drop_lower"] is None:
                continue
            lower = figures["drop_lower"]
            rows.append({"name": f"{decision} {score} drop", "value": lower, "limit": config.max_drop,
                         "margin": config.max_drop - lower, "passed": lower <= config.max_drop + 1e-9,
                         "text": f"{decision} {score} drop at least {lower * 100:.2f} points ({figures['fp32']:.4f} -> "
                                 f"{figures['int8']:.4f}, {config.confidence:.0%} CI of the change "
                                 f"[{figures['delta_ci'][0] * 100:+.2f}, {figures['delta_ci'][1] * 100:+.2f}] on "
                                 f"{labelled['n_images']} test images; allowed {config.max_drop * 100:.2f})"})  # fmt: skip
    return rows


def _deciding_line(criterion: dict[str, Any], passed: bool, n_images: int, labelled: dict | None) -> str:
    verdict = "passed" if passed else "FAILED"
    where = f"{n_images} images" + (f", {labelled['n_images']} labelled" if labelled else ", no labels")
    return f"INT8 gate {verdict} ({where}); deciding: {criterion['text']}"


def _summary(agreement: dict[str, Any], labelled: dict[str, Any] | None, spec: ModelSpec) -> dict[str, Any]:
    """The point figures under the names runtimes read (precision's gate summary, serve's
    recorded figures): per decision, fp32 and INT8 scores and their delta on the test split."""
    summary: dict[str, Any] = {
        "reference": "labels" if labelled else "fp32_decisions",
        "n_images": labelled["n_images"] if labelled else agreement["n_images"],
        "positive_class": spec.positive_class,
        "decision_rule": spec.decision_rule.describe(),
        "decision_agreement": agreement["rule"],
        "max_abs_diff_probabilities": agreement["max_abs_diff_probabilities"],
        "logit_relative_error": agreement["logit_relative_error"],
    }
    if labelled:
        for key in ("fp32", "int8", "delta"):
            summary[key] = {d: {s: labelled[d][s][key] for s in SCORES} for d in DECISIONS}
    return summary


class Int8Gate:
    """The fp32 model's outputs on the gate's images, computed once; :meth:`__call__` judges an
    INT8 file against them (the repair loop judges several)."""

    def __init__(
        self, fp32_path: str | os.PathLike[str], images: GateImages, config: Int8GateConfig, *, batch_size: int = 16
    ) -> None:
        from kidney_edge.runtime import OnnxClassifier

        if not images.paths:
            raise InputError("the INT8 gate needs images: pass --splits with a test split, or --images")
        self.images, self.config, self.batch_size = images, config, batch_size
        fp32 = OnnxClassifier(fp32_path, ood=False)
        self.spec = fp32.spec
        self.fp32 = fp32.predict_files(images.paths, batch_size)

    def __call__(self, int8_path: str | os.PathLike[str]) -> dict[str, Any]:
        from kidney_edge.runtime import OnnxClassifier

        int8 = OnnxClassifier(int8_path, ood=False).predict_files(self.images.paths, self.batch_size)
        return judge(self.fp32, int8, self.images, self.spec, self.config)
