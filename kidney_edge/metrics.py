"""Clinical classification metrics, bootstrap confidence intervals, calibration, operating points.

scikit-learn computes what it has (precision/recall/F1, confusion matrix, balanced accuracy,
ROC-AUC, average precision); the rest is hand-written on numpy: specificity, the stratified
bootstrap (vectorised over resamples), expected calibration error, temperature scaling and the
tumor threshold. Undefined values (the AUC of a class absent from ``y_true``, the specificity of
a split made of one class) are ``None``, never a crash and never a silent 0.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from kidney_edge.errors import InputError
from kidney_edge.spec import DecisionRule, RuleKind, log_softmax

log = logging.getLogger(__name__)

ECE_BINS = 15  # equal-width confidence bins (Guo et al. 2017, "On Calibration of Modern Neural Networks")
CI_LEVEL = 0.95
# Bounds for the temperature search; beyond them a model is broken, not miscalibrated.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probabilities: np.ndarray,
    class_names: tuple[str, ...] | list[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: Sequence[str] | np.ndarray | None = None,
) -> dict[str, Any]:
    """All test-set figures for (N,) true and predicted class indices and (N, C) probabilities.

    Macro-F1 averages over the classes that occur in ``y_true`` or ``y_pred`` (scikit-learn's
    default label set): a class absent from both says nothing about the model. ``ci`` resamples
    images; with ``groups`` (each image's patient or split group) ``ci_groups`` resamples whole
    groups as well, the interval to trust when a patient contributes several alike slices.
    """
    class_names = tuple(class_names)
    y_true, y_pred, probabilities = _check_inputs(y_true, y_pred, probabilities, len(class_names))
    n_classes = len(class_names)
    cm = confusion_counts(y_true, y_pred, n_classes)
    per_class = _per_class(y_true, y_pred, probabilities, class_names, cm)
    return {
        "n_samples": int(len(y_true)),
        "labels": list(class_names),
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, n_classes),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": _row_normalise(cm).tolist(),
        "ci": bootstrap_ci(y_true, y_pred, class_names, n_bootstrap=n_bootstrap, seed=seed),
        "ece": expected_calibration_error(probabilities, y_true),
        "reliability": reliability_bins(probabilities, y_true),
        **_grouped_ci(y_true, y_pred, class_names, groups, n_bootstrap=n_bootstrap, seed=seed),
    }


def _grouped_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: tuple[str, ...],
    groups: Sequence[str] | np.ndarray | None,
    **bootstrap: Any,
) -> dict[str, Any]:
    """``ci_groups`` and ``n_groups`` when groups are known, else nothing."""
    if groups is None:
        return {}
    groups = np.asarray(groups)
    if groups.shape != y_true.shape:
        raise InputError(f"metric inputs disagree: {len(groups)} groups for {len(y_true)} images")
    return {
        "ci_groups": bootstrap_ci(y_true, y_pred, class_names, groups=groups, **bootstrap),
        "n_groups": int(len(np.unique(groups))),
    }


def _check_inputs(
    y_true: np.ndarray, y_pred: np.ndarray, probabilities: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(y_true) == 0:
        raise InputError("cannot compute metrics on an empty set of predictions")
    if y_pred.shape != y_true.shape or probabilities.shape != (len(y_true), n_classes):
        raise InputError(
            f"metric inputs disagree: y_true {y_true.shape}, y_pred {y_pred.shape}, "
            f"probabilities {probabilities.shape}, {n_classes} classes"
        )
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        if values.min() < 0 or values.max() >= n_classes:
            raise InputError(f"{name} holds class indices outside 0..{n_classes - 1}")
    return y_true, y_pred, probabilities


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts; rows are true classes, columns predicted (scikit-learn's layout)."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes))).astype(np.int64)


def _row_normalise(cm: np.ndarray) -> np.ndarray:
    rows = cm.sum(axis=1, keepdims=True)
    # A class absent from y_true has an all-zero row: leave it zero rather than divide by 0.
    return np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over the classes present in ``y_true`` or ``y_pred`` (zero_division=0)."""
    from sklearn.metrics import f1_score

    present = sorted(set(np.unique(y_true)) | set(np.unique(y_pred)))
    return float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": the score is still the mean recall of the
        # classes in y_true, which is what we want.
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y_true, y_pred))


def _per_class(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probabilities: np.ndarray,
    class_names: tuple[str, ...],
    cm: np.ndarray,
) -> dict[str, dict[str, Any]]:
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    total = cm.sum()
    result = {}
    for k, name in enumerate(class_names):
        negatives = total - cm[k, :].sum()  # TN + FP
        false_positives = cm[:, k].sum() - cm[k, k]
        result[name] = {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "specificity": float((negatives - false_positives) / negatives) if negatives else None,
            "f1": float(f1[k]),
            "support": int(support[k]),
            "predicted": int(cm[:, k].sum()),
            "roc_auc": _one_vs_rest(y_true == k, probabilities[:, k], "roc_auc"),
            "average_precision": _one_vs_rest(y_true == k, probabilities[:, k], "average_precision"),
        }
    return result


def _one_vs_rest(is_positive: np.ndarray, score: np.ndarray, kind: str) -> float | None:
    """ROC-AUC or average precision of one class against the rest; None when undefined."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    n_positive = int(is_positive.sum())
    if n_positive == 0 or (kind == "roc_auc" and n_positive == len(is_positive)):
        return None  # AUC needs both outcomes; AP needs at least one positive
    scorer = roc_auc_score if kind == "roc_auc" else average_precision_score
    return float(scorer(is_positive.astype(np.int64), score))


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: tuple[str, ...],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = CI_LEVEL,
    groups: np.ndarray | None = None,
) -> dict[str, list[float] | None]:
    """Percentile confidence intervals from a stratified bootstrap.

    Each resample draws, within every true class, as many items as that class has (with
    replacement), so class supports stay fixed and every class present in the test set is
    present in every resample. With ``groups`` (e.g. the patient of each slice) whole groups are
    drawn instead, within the class of each group's first item: slices of one patient are alike,
    so counting them as independent draws makes intervals too narrow. Keys: ``accuracy``,
    ``macro_f1``, ``recall_<cls>`` and ``precision_<cls>``; an interval is None when the
    statistic is undefined.
    """
    n_classes = len(class_names)
    if n_bootstrap < 1:
        return {}
    if groups is None:
        index = _stratified_indices(y_true, n_bootstrap, seed)  # (B, N)
        cms = _batched_confusion(y_true[index], y_pred[index], n_classes)  # (B, C, C)
    else:
        draws = _grouped_indices(y_true, np.asarray(groups), n_bootstrap, seed)
        cms = np.concatenate([_batched_confusion(y_true[i][None], y_pred[i][None], n_classes)
                              for i in draws])  # (B, C, C)  # fmt: skip
    tp = np.diagonal(cms, axis1=1, axis2=2).astype(np.float64)  # (B, C)
    support, predicted = cms.sum(axis=2), cms.sum(axis=1)  # (B, C) each
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = tp / support  # NaN where the class has no items
        precision = tp / predicted  # NaN where the class was never predicted
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), np.nan)
    present = (support + predicted) > 0  # same label set as macro_f1()
    macro = np.where(present, np.nan_to_num(f1), 0).sum(axis=1) / present.sum(axis=1)
    ci: dict[str, list[float] | None] = {
        "accuracy": _percentiles(tp.sum(axis=1) / cms.sum(axis=(1, 2)), level),
        "macro_f1": _percentiles(macro, level),
    }
    for k, name in enumerate(class_names):
        ci[f"recall_{name}"] = _percentiles(recall[:, k], level)
        ci[f"precision_{name}"] = _percentiles(precision[:, k], level)
    return ci


def _stratified_indices(y_true: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = []
    for cls in np.unique(y_true):
        members = np.flatnonzero(y_true == cls)
        blocks.append(members[rng.integers(0, len(members), size=(n_bootstrap, len(members)))])
    return np.concatenate(blocks, axis=1)


def _grouped_indices(
    y_true: np.ndarray, groups: np.ndarray, n_bootstrap: int, seed: int
) -> list[np.ndarray]:
    """Per resample, the items of groups drawn with replacement, as many per class as it has."""
    names, first, member_of = np.unique(groups, return_index=True, return_inverse=True)
    members = [np.flatnonzero(member_of == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y_true[first] == cls) for cls in np.unique(y_true[first])]
    drawn = np.concatenate([group_ids[rng.integers(0, len(group_ids), size=(n_bootstrap, len(group_ids)))]
                            for group_ids in by_class], axis=1)  # (B, number of groups)  # fmt: skip
    return [np.concatenate([members[g] for g in row]) for row in drawn]


def _batched_confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(B, N) true/predicted indices -> (B, C, C) confusion matrices with one bincount."""
    n_resamples = y_true.shape[0]
    offsets = np.arange(n_resamples, dtype=np.int64)[:, None] * n_classes * n_classes
    codes = offsets + y_true * n_classes + y_pred
    counts = np.bincount(codes.ravel(), minlength=n_resamples * n_classes * n_classes)
    return counts.reshape(n_resamples, n_classes, n_classes)


def _percentiles(values: np.ndarray, level: float) -> list[float] | None:
    defined = values[~np.isnan(values)]
    # Defined in fewer than half the resamples: the statistic is not estimable here.
    if len(defined) == 0 or len(defined) < 0.5 * len(values):
        return None
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(defined, [tail, 100 - tail])
    return [float(low), float(high)]


# --------------------------------------------------------------------------- calibration


def reliability_bins(
    probabilities: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, list]:
    """Per equal-width confidence bin: edges, item count, mean confidence and accuracy.

    Confidence is the top-class probability; empty bins have confidence/accuracy None.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lo, hi]; a confidence of exactly 0 cannot happen for a softmax.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(which, weights=correct, minlength=n_bins)
    return {
        "edges": edges.tolist(),
        "count": counts.tolist(),
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, counts, strict=True)],
        "accuracy": [float(s / c) if c else None for s, c in zip(correct_sum, counts, strict=True)],
    }


def expected_calibration_error(
    probabilities: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width bins."""
    bins = reliability_bins(probabilities, y_true, n_bins)
    total = sum(bins["count"])
    gap = sum(
        n * abs(acc - conf)
        for n, acc, conf in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
        if n
    )
    return float(gap / total)


def negative_log_likelihood(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean cross-entropy of temperature-scaled logits (the spec's softmax, in log space)."""
    log_probabilities = log_softmax(logits, temperature)  # (N, C)
    return float(np.mean(-log_probabilities[np.arange(len(log_probabilities)), y_true]))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature T minimising validation NLL of softmax(logits / T) (Guo et al. 2017).

    Searched over log T (a smooth 1-D problem) within :data:`TEMPERATURE_BOUNDS`. When every
    validation item is already classified correctly the NLL keeps falling as T -> 0, so there
    is no optimum to find: T = 1 is kept (with a warning) rather than a near-zero T that
    would push every probability to 0 or 1.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) == 0:
        raise InputError("cannot fit a temperature on an empty validation split")
    if np.all(logits.argmax(axis=1) == y_true):
        log.warning("every validation item is classified correctly: temperature undefined, keeping T = 1")
        return 1.0
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, y_true, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-5},
    )
    temperature = float(math.exp(result.x))
    if min(abs(result.x - low), abs(result.x - high)) < 1e-3:
        log.warning("temperature %.3g sits at the search bound %s", temperature, TEMPERATURE_BOUNDS)
    return temperature


# --------------------------------------------------------------------------- operating point


def threshold_for_recall(positive_scores: np.ndarray, is_positive: np.ndarray, target_recall: float) -> float:
    """Largest threshold t with recall(score >= t) >= target_recall.

    With the positives' scores sorted high to low, the k = ceil(target * n_pos)-th of them is
    that threshold: any higher t loses the k-th positive and falls below the target.
    """
    _check_target(target_recall)
    scores = np.sort(np.asarray(positive_scores, dtype=np.float64)[np.asarray(is_positive, bool)])[::-1]
    if len(scores) == 0:
        raise InputError("cannot choose a threshold: the validation split has no positive items")
    return float(scores[_needed(target_recall, len(scores)) - 1])


def _too_costly(others: np.ndarray, threshold: float, n_other: int, limit: float | None) -> str:
    """'' when the threshold's added positive calls among the other items fit ``limit`` (a share
    of ``n_other``), else those calls in words."""
    added = int(np.count_nonzero(others >= threshold))
    if limit is None or n_other == 0 or added <= limit * n_other:
        return ""
    return f"{added} of {n_other} other validation items positive ({added / n_other:.0%}; at most {limit:.0%})"


def _check_target(target_recall: float) -> None:
    if not 0.0 < target_recall <= 1.0:
        raise InputError(f"--tumor-recall must be in (0, 1], got {target_recall}")


def _needed(target_recall: float, n_positive: int) -> int:
    """How many of ``n_positive`` items a recall of ``target_recall`` must catch."""
    return max(1, math.ceil(target_recall * n_positive - 1e-9))


# A threshold that reaches the target recall on validation only by calling many other items
# positive is set by one or two outlying positives, not an operating point: with a few dozen
# validation tumours, the last one can sit at p(Tumor) near zero, and a threshold there labels
# a large share of every other class Tumor on new data.
MAX_ADDED_FALSE_POSITIVES = 0.05  # share of the other validation items a threshold may add calls on


def tumor_decision_rule(
    probabilities: np.ndarray,
    y_true: np.ndarray,
    class_names: tuple[str, ...],
    *,
    positive_class: str | None,
    target_recall: float = 0.98,
    max_added_false_positives: float | None = MAX_ADDED_FALSE_POSITIVES,
) -> DecisionRule | None:
    """The operating point for ``positive_class`` that reaches ``target_recall`` on these (validation) data.

    The rule only adds positive calls to argmax (:class:`DecisionRule`), so its threshold
    matters only for positives that argmax misses. When argmax alone reaches the target, the
    rule is argmax and says so. Otherwise the threshold is the largest t that reaches the
    target under the rule: the k-th highest p(positive) among the positives argmax misses,
    with k the positive calls still needed. When no other item scores at or above the
    positives the rule must catch (validation separates them), any t in the gap reaches the
    target and the gap's midpoint is taken instead of its edge, with a note saying so. A
    threshold that would newly call more than ``max_added_false_positives`` of the other
    validation items positive is refused (None: no limit): the rule stays argmax, with a note
    saying why.

    Returns None, with a logged note, when there is no positive class or no positive item.
    """
    _check_target(target_recall)
    if positive_class is None or positive_class not in class_names:
        log.info("no positive class among %s: keeping the argmax rule", list(class_names))
        return None
    k = class_names.index(positive_class)
    y_true = np.asarray(y_true)
    is_positive = y_true == k
    if not is_positive.any():
        log.warning("validation split has no %s items: keeping the argmax rule", positive_class)
        return None
    # The stored threshold is compared with float32 probabilities (spec.probabilities, ONNX):
    # choose it among float32 values so the comparison is exact at the boundary.
    probabilities = np.asarray(probabilities, dtype=np.float32)
    caught = probabilities.argmax(axis=1) == k
    still_needed = _needed(target_recall, int(is_positive.sum())) - int((caught & is_positive).sum())
    if still_needed <= 0:
        return DecisionRule(
            kind=RuleKind.ARGMAX.value, positive_class=positive_class, target_recall=target_recall
        )
    scores = probabilities[:, k].astype(np.float64)
    missed = np.sort(scores[is_positive & ~caught])[::-1]
    threshold = float(missed[still_needed - 1])
    note = ""
    others = scores[~is_positive & ~caught]  # the items the rule could turn into false positives
    if len(others) and others.max() < threshold:
        gap_low = float(others.max())
        threshold = float(np.float32((gap_low + threshold) / 2))
        note = (
            f"validation separates the {positive_class} items the rule must add (p >= "
            f"{float(missed[still_needed - 1]):.4f}) from every other item (p <= {gap_low:.4f}): "
            "threshold at the gap's midpoint"
        )
        log.info(note)
    refused = _too_costly(others, threshold, int((~is_positive).sum()), max_added_false_positives)
    if refused:
        note = (f"argmax kept: reaching {positive_class} recall {target_recall:g} on validation needs "
                f"p({positive_class}) >= {threshold:.4f}, which would call {refused}")  # fmt: skip
        log.warning(note)
        return DecisionRule(kind=RuleKind.ARGMAX.value, positive_class=positive_class, note=note)
    return DecisionRule(
        kind=RuleKind.THRESHOLD.value,
        positive_class=positive_class,
        threshold=threshold,
        target_recall=target_recall,
        note=note,
    )
