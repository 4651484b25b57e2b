"""Metric code against hand-computed cases and scikit-learn."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from kidney_edge import metrics
from kidney_edge.errors import InputError
from kidney_edge.spec import DecisionRule, ModelSpec, softmax

CLASSES = ("Cyst", "Normal", "Stone", "Tumor")


def one_hot_probs(y_pred: np.ndarray, n_classes: int = 4, confidence: float = 0.7) -> np.ndarray:
    probs = np.full((len(y_pred), n_classes), (1 - confidence) / (n_classes - 1))
    probs[np.arange(len(y_pred)), y_pred] = confidence
    return probs


def noisy_predictions(n: int = 400, accuracy: float = 0.8, seed: int = 0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, n)
    y_pred = np.where(rng.random(n) < accuracy, y_true, rng.integers(0, 4, n))
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y_pred] += 2.0
    return y_true, y_pred, softmax(logits)


def test_hand_computed_case_with_a_class_never_predicted() -> None:
    # Stone (2) is never predicted; Tumor (3) is absent from y_true but predicted once.
    y_true = np.array([0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 0, 3])
    result = metrics.classification_metrics(y_true, y_pred, one_hot_probs(y_pred), CLASSES, n_bootstrap=50)
    cyst, normal, stone, tumor = (result["per_class"][c] for c in CLASSES)
    assert result["accuracy"] == pytest.approx(4 / 7)
    assert cyst["precision"] == pytest.approx(2 / 3) and cyst["recall"] == pytest.approx(2 / 3)
    assert cyst["specificity"] == pytest.approx(3 / 4)  # negatives 1,1,2,2: one predicted Cyst
    assert normal["precision"] == pytest.approx(2 / 3) and normal["recall"] == 1.0
    assert normal["f1"] == pytest.approx(0.8)
    assert stone["precision"] == 0.0 and stone["recall"] == 0.0 and stone["f1"] == 0.0
    assert stone["predicted"] == 0 and stone["specificity"] == 1.0
    assert tumor["support"] == 0 and tumor["recall"] == 0.0 and tumor["specificity"] == pytest.approx(6 / 7)
    # Tumor is absent from y_true: its AUC and AP are undefined, not a crash and not 0.
    assert tumor["roc_auc"] is None and tumor["average_precision"] is None
    assert result["ci"]["recall_Tumor"] is None
    # Macro-F1 over the 4 classes that occur in y_true or y_pred: (2/3 + 0.8 + 0 + 0) / 4.
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 4)
    # Balanced accuracy: mean recall over classes present in y_true.
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert result["confusion_matrix"] == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0]]
    assert result["confusion_matrix_normalized"][3] == [0.0, 0.0, 0.0, 0.0]
    assert result["confusion_matrix_normalized"][0] == pytest.approx([2 / 3, 1 / 3, 0, 0])


def test_perfect_classifier() -> None:
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    result = metrics.classification_metrics(y, y, one_hot_probs(y, confidence=1.0), CLASSES, n_bootstrap=100)
    assert result["accuracy"] == result["macro_f1"] == result["balanced_accuracy"] == 1.0
    for name in CLASSES:
        per_class = result["per_class"][name]
        assert per_class["precision"] == per_class["recall"] == per_class["specificity"] == 1.0
        assert per_class["roc_auc"] == per_class["average_precision"] == 1.0
        assert result["ci"][f"recall_{name}"] == [1.0, 1.0]
    assert result["ci"]["accuracy"] == [1.0, 1.0]
    assert result["ece"] == pytest.approx(0.0)


def test_all_wrong_classifier() -> None:
    y_true = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    y_pred = (y_true + 1) % 4
    result = metrics.classification_metrics(y_true, y_pred, one_hot_probs(y_pred, confidence=0.9), CLASSES)
    assert result["accuracy"] == result["macro_f1"] == result["balanced_accuracy"] == 0.0
    assert all(result["per_class"][c]["recall"] == 0.0 for c in CLASSES)
    # Per class: 2 positives score 0.033; of 6 negatives, 2 score 0.9 and 4 tie at 0.033,
    # so AUC = (0 wins + 4 ties * 0.5) / 6 = 1/3: worse than chance.
    assert all(result["per_class"][c]["roc_auc"] == pytest.approx(1 / 3) for c in CLASSES)
    assert result["ci"]["macro_f1"] == [0.0, 0.0]
    assert result["ece"] == pytest.approx(0.9)  # confident 0.9, accuracy 0


def test_agrees_with_scikit_learn() -> None:
    y_true, y_pred, probs = noisy_predictions()
    result = metrics.classification_metrics(y_true, y_pred, probs, CLASSES, n_bootstrap=10)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    for k, name in enumerate(CLASSES):
        per_class = result["per_class"][name]
        assert per_class["precision"] == pytest.approx(precision[k])
        assert per_class["recall"] == pytest.approx(recall[k])
        assert per_class["f1"] == pytest.approx(f1[k])
        assert per_class["support"] == support[k]
        assert per_class["roc_auc"] == pytest.approx(roc_auc_score(y_true == k, probs[:, k]))
        assert per_class["average_precision"] == pytest.approx(
            average_precision_score(y_true == k, probs[:, k])
        )
        # Specificity of class k == recall of "not k" in the one-vs-rest problem.
        not_k = precision_recall_fscore_support(y_true != k, y_pred != k, average="binary")[1]
        assert per_class["specificity"] == pytest.approx(not_k)
    assert result["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_bootstrap_contains_estimate_is_deterministic_and_fast() -> None:
    y_true, y_pred, probs = noisy_predictions(n=2000)
    started = time.process_time()  # CPU time: robust to other jobs on a shared machine
    ci = metrics.bootstrap_ci(y_true, y_pred, CLASSES, n_bootstrap=1000, seed=0)
    assert time.process_time() - started < 1.0  # vectorised: ~0.1 s; a per-resample loop takes seconds
    assert ci == metrics.bootstrap_ci(y_true, y_pred, CLASSES, n_bootstrap=1000, seed=0)
    assert ci != metrics.bootstrap_ci(y_true, y_pred, CLASSES, n_bootstrap=1000, seed=1)
    point = metrics.classification_metrics(y_true, y_pred, probs, CLASSES, n_bootstrap=0)
    estimates = {"accuracy": point["accuracy"], "macro_f1": point["macro_f1"]}
    estimates |= {f"recall_{c}": point["per_class"][c]["recall"] for c in CLASSES}
    for key, value in estimates.items():
        low, high = ci[key]
        assert low <= value <= high, key
        assert 0.0 < high - low < 0.1, key  # ~500 items per class: a few points wide


def test_bootstrap_is_stratified() -> None:
    # 3 Tumor items among 100: stratified resampling keeps them in every resample, so the
    # Tumor recall interval exists and reflects the 2/3 hit rate.
    y_true = np.array([0] * 97 + [3] * 3)
    y_pred = np.array([0] * 97 + [3, 3, 0])
    ci = metrics.bootstrap_ci(y_true, y_pred, CLASSES, n_bootstrap=500)
    low, high = ci["recall_Tumor"]
    assert 0.0 <= low < 2 / 3 < high <= 1.0
    assert ci["recall_Normal"] is None and ci["recall_Cyst"] == [1.0, 1.0]


def test_grouped_bootstrap_draws_patients_not_slices() -> None:
    y_true, y_pred, _ = noisy_predictions(n=200)
    slices = metrics.bootstrap_ci(y_true, y_pred, CLASSES, n_bootstrap=300, seed=0)
    # One slice per patient: the same draws as the slice bootstrap.
    assert metrics.bootstrap_ci(y_true, y_pred, CLASSES, n_bootstrap=300, seed=0,
                                groups=np.arange(200)) == slices  # fmt: skip
    # Five alike slices per patient: drawn together, the interval is the one-slice interval;
    # drawn as slices, five times the items make it narrower than the patients allow.
    alike_true, alike_pred = np.repeat(y_true, 5), np.repeat(y_pred, 5)
    patients = np.repeat(np.arange(200), 5)
    grouped = metrics.bootstrap_ci(alike_true, alike_pred, CLASSES, n_bootstrap=300, seed=0, groups=patients)
    for key, interval in slices.items():
        assert grouped[key] == pytest.approx(interval), key
    naive = metrics.bootstrap_ci(alike_true, alike_pred, CLASSES, n_bootstrap=300, seed=0)
    assert naive["macro_f1"][1] - naive["macro_f1"][0] < 0.6 * (grouped["macro_f1"][1] - grouped["macro_f1"][0])


def test_classification_metrics_add_group_intervals_only_when_groups_are_known() -> None:
    y_true, y_pred, probabilities = noisy_predictions(n=200)
    alike = (np.repeat(y_true, 4), np.repeat(y_pred, 4), np.repeat(probabilities, 4, axis=0))
    patients = np.repeat([f"p{k}" for k in range(200)], 4)
    plain = metrics.classification_metrics(*alike, CLASSES, n_bootstrap=200)
    assert "ci_groups" not in plain and "n_groups" not in plain
    grouped = metrics.classification_metrics(*alike, CLASSES, n_bootstrap=200, groups=patients)
    assert grouped["n_groups"] == 200 and grouped["ci"] == plain["ci"]
    assert grouped["ci_groups"] == metrics.bootstrap_ci(*alike[:2], CLASSES, n_bootstrap=200, groups=patients)
    width = {key: grouped[key]["macro_f1"][1] - grouped[key]["macro_f1"][0] for key in ("ci", "ci_groups")}
    assert width["ci_groups"] > 1.5 * width["ci"]
    with pytest.raises(InputError, match="3 groups for 800 images"):
        metrics.classification_metrics(*alike, CLASSES, n_bootstrap=10, groups=["a", "b", "c"])


def test_ece_and_reliability_bins_by_hand() -> None:
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    y_true = np.array([0, 1, 0, 0])
    bins = metrics.reliability_bins(probs, y_true, n_bins=10)
    assert bins["count"][9] == 2 and bins["count"][5] == 2 and sum(bins["count"]) == 4
    assert bins["accuracy"][9] == 0.5 and bins["confidence"][9] == pytest.approx(0.95)
    assert bins["accuracy"][5] == 0.5 and bins["confidence"][5] == pytest.approx(0.55)
    assert bins["accuracy"][0] is None
    assert metrics.expected_calibration_error(probs, y_true, n_bins=10) == pytest.approx(
        0.5 * 0.45 + 0.5 * 0.05
    )


def test_temperature_fit_recovers_known_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=2.0, size=(3000, 4))
    # Labels drawn from softmax(true_logits); the model reports logits 2.5x too sharp.
    cumulative = softmax(true_logits).cumsum(axis=1)
    y_true = (rng.random((3000, 1)) > cumulative).sum(axis=1)
    temperature = metrics.fit_temperature(true_logits * 2.5, y_true)
    assert temperature == pytest.approx(2.5, rel=0.1)
    nll_fit = metrics.negative_log_likelihood(true_logits * 2.5, y_true, temperature)
    assert nll_fit < metrics.negative_log_likelihood(true_logits * 2.5, y_true, 1.0)
    with pytest.raises(InputError, match="empty validation"):
        metrics.fit_temperature(np.zeros((0, 4)), np.zeros(0, dtype=int))


def test_temperature_is_kept_at_one_when_validation_is_separable(caplog: pytest.LogCaptureFixture) -> None:
    # All correct: NLL falls forever as T -> 0; no temperature should be "fitted".
    logits = np.eye(4)[[0, 1, 2, 3, 0, 1]] * 3.0
    with caplog.at_level("WARNING", logger="kidney_edge.metrics"):
        assert metrics.fit_temperature(logits, np.array([0, 1, 2, 3, 0, 1])) == 1.0
    assert "classified correctly" in caplog.text


def test_threshold_for_recall_is_the_largest_that_reaches_the_target() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.99])
    is_positive = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    assert metrics.threshold_for_recall(scores, is_positive, 0.8) == 0.2  # 8 of 10 positives
    assert metrics.threshold_for_recall(scores, is_positive, 0.81) == 0.1  # needs 9
    assert metrics.threshold_for_recall(scores, is_positive, 1.0) == 0.05
    with pytest.raises(InputError, match="tumor-recall"):
        metrics.threshold_for_recall(scores, is_positive, 0.0)


def test_tumor_rule_reaches_target_recall_on_validation() -> None:
    y_true, _, probs = noisy_predictions(n=600, accuracy=0.6, seed=3)
    rule = metrics.tumor_decision_rule(probs, y_true, CLASSES, positive_class="Tumor", target_recall=0.98,
                                       max_added_false_positives=None)  # the threshold search alone  # fmt: skip
    assert rule is not None and rule.kind == "threshold" and rule.positive_class == "Tumor"
    assert rule.note == ""  # noisy validation: no separation, the largest threshold is kept
    spec = ModelSpec(decision_rule=rule)
    decided = spec.decide(probs.astype(np.float32))
    tumor = y_true == 3
    recall = np.mean(decided[tumor] == 3)
    assert recall >= 0.98
    # Largest threshold: nudging it up drops recall below the target.
    higher = spec.replace(decision_rule=dataclasses.replace(rule, threshold=rule.threshold + 1e-6))
    assert np.mean(higher.decide(probs.astype(np.float32))[tumor] == 3) < 0.98
    # Argmax alone reaches far less than that at 60 % accuracy.
    assert np.mean(probs[tumor].argmax(axis=1) == 3) < recall


def test_a_threshold_that_calls_many_others_positive_is_refused() -> None:
    """One outlying validation tumour (argmax Normal, p(Tumor) 0.015) must not set the operating
    point: catching it would call most other items Tumor. A cheap threshold is still taken."""
    rng = np.random.default_rng(0)
    n = 100  # 20 per class in order Cyst, Normal, Stone, Tumor; 20 extra Normal
    y_true = np.repeat([0, 1, 2, 3, 1], 20)
    probs = np.full((n, 4), 0.01)
    probs[np.arange(n), y_true] = 0.9
    probs[y_true != 3, 3] = rng.uniform(0.02, 0.05, size=80)  # everyone else: p(Tumor) 2-5%
    probs[60, :] = [0.02, 0.955, 0.01, 0.015]  # the outlier: a Tumor that looks Normal
    probs /= probs.sum(axis=1, keepdims=True)
    refused = metrics.tumor_decision_rule(probs, y_true, CLASSES, positive_class="Tumor", target_recall=0.98)
    assert refused.kind == "argmax" and refused.target_recall is None
    assert refused.describe().startswith("argmax; argmax kept: reaching Tumor recall 0.98 on validation")
    assert "which would call 80 of 80 other validation items positive (100%; at most 5%)" in refused.note
    unlimited = metrics.tumor_decision_rule(probs, y_true, CLASSES, positive_class="Tumor", target_recall=0.98,
                                            max_added_false_positives=None)  # fmt: skip
    assert unlimited.kind == "threshold" and unlimited.threshold < 0.02  # the old behaviour, on request
    probs[60, 3] = 0.3  # the missed tumour scores above every other item: a cheap threshold
    probs /= probs.sum(axis=1, keepdims=True)
    cheap = metrics.tumor_decision_rule(probs, y_true, CLASSES, positive_class="Tumor", target_recall=0.98,
                                        max_added_false_positives=0.05)  # fmt: skip
    assert cheap.kind == "threshold" and cheap.note.startswith("validation separates")


def test_rule_only_adds_positive_calls() -> None:
    # Row 0: argmax Tumor at p 0.40 < t: stays Tumor. Row 1: p(Tumor) 0.35 >= t: becomes Tumor.
    # Row 2: p(Tumor) 0.10 < t: keeps its argmax (Normal), not the argmax of the other classes.
    probs = np.array([[0.3, 0.3, 0.0, 0.4], [0.45, 0.2, 0.0, 0.35], [0.1, 0.7, 0.1, 0.1]])
    rule = DecisionRule(kind="threshold", positive_class="Tumor", threshold=0.3)
    assert rule.decide(probs, CLASSES).tolist() == [3, 3, 1]
    strict = DecisionRule(kind="threshold", positive_class="Tumor", threshold=1.0)
    assert strict.decide(probs, CLASSES).tolist() == [3, 0, 1]  # t = 1 is argmax, never fewer Tumors


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 60),
    threshold=st.floats(0.0, 1.0),
    target=st.floats(0.05, 1.0),
    sharpness=st.floats(0.1, 8.0),
)
def test_rule_never_removes_an_argmax_tumor(seed: int, n: int, threshold: float, target: float, sharpness: float) -> None:
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(scale=sharpness, size=(n, 4))).astype(np.float32)
    y_true = rng.integers(0, 4, n)
    argmax_tumor = probs.argmax(axis=1) == 3
    rules = [DecisionRule(kind="threshold", positive_class="Tumor", threshold=threshold)]
    chosen = metrics.tumor_decision_rule(probs, y_true, CLASSES, positive_class="Tumor", target_recall=target,
                                         max_added_false_positives=None)  # fmt: skip
    rules += [chosen] if chosen is not None else []
    for rule in rules:
        decided = rule.decide(probs, CLASSES)
        assert (decided[argmax_tumor] == 3).all()
        # Only Tumor calls are added: every other row keeps its argmax label.
        assert (decided[~argmax_tumor & (decided != 3)] == probs.argmax(axis=1)[~argmax_tumor & (decided != 3)]).all()
        tumor = y_true == 3
        if tumor.any():
            assert np.mean(decided[tumor] == 3) >= np.mean(argmax_tumor[tumor])
    if chosen is not None:  # the chosen operating point reaches its target on the data it was chosen on
        assert np.mean(chosen.decide(probs, CLASSES)[y_true == 3] == 3) >= target - 1e-9


def test_rule_is_argmax_when_argmax_meets_the_target() -> None:
    # Every validation Tumor is the argmax at p 1.0: the old rule became "Tumor if p >= 1.0".
    y_true = np.array([3, 3, 3, 0, 1, 2])
    probs = np.eye(4, dtype=np.float32)[y_true]
    rule = metrics.tumor_decision_rule(probs, y_true, CLASSES, positive_class="Tumor", target_recall=0.98)
    assert rule is not None and rule.kind == "argmax" and rule.threshold is None
    assert rule.positive_class == "Tumor" and rule.target_recall == 0.98
    assert rule.describe() == "argmax (it meets Tumor recall 0.98 on validation)"
    # On a test item that argmax calls Tumor at a modest p, the rule still calls Tumor.
    assert rule.decide(np.array([[0.3, 0.2, 0.1, 0.4]]), CLASSES).tolist() == [3]


def test_separated_validation_takes_the_gap_midpoint() -> None:
    # Two Tumors that argmax misses (p 0.45 and 0.40); every other item has p(Tumor) <= 0.10.
    y_true = np.array([3, 3, 3, 0, 1, 2, 0])
    probs = np.array(
        [[0.0, 0.0, 0.0, 1.0], [0.55, 0.0, 0.0, 0.45], [0.0, 0.6, 0.0, 0.4],
         [0.9, 0.0, 0.0, 0.1], [0.05, 0.9, 0.0, 0.05], [0.0, 0.0, 1.0, 0.0], [0.95, 0.0, 0.0, 0.05]],
        dtype=np.float32,
    )  # fmt: skip
    rule = metrics.tumor_decision_rule(probs, y_true, CLASSES, positive_class="Tumor", target_recall=1.0)
    assert rule is not None and rule.kind == "threshold"
    assert rule.threshold == pytest.approx((0.40 + 0.10) / 2)  # not the edge value 0.40
    assert "separates" in rule.note and "midpoint" in rule.describe()
    assert (rule.decide(probs, CLASSES) == y_true).all()


def test_tumor_rule_skipped_without_a_positive_class(caplog: pytest.LogCaptureFixture) -> None:
    y_true, _, probs = noisy_predictions(n=50)
    spec = ModelSpec(class_names=("a", "b", "c", "d"))
    assert spec.positive_class is None  # the default "Tumor" is not among these classes
    with caplog.at_level("INFO", logger="kidney_edge.metrics"):
        assert metrics.tumor_decision_rule(probs, y_true, spec.class_names, positive_class=spec.positive_class) is None
    assert "no positive class" in caplog.text


def test_old_threshold_specs_are_read_under_the_adding_rule() -> None:
    old = ModelSpec().to_dict()
    old.pop("positive_class")
    old["schema_version"] = 1
    old["decision_rule"] = {"kind": "threshold", "positive_class": "Tumor", "threshold": 0.9, "target_recall": 0.98}
    spec = ModelSpec.from_dict(old)
    assert spec.positive_class == "Tumor"
    assert spec.decide(np.array([[0.1, 0.1, 0.1, 0.7]])).tolist() == [3]  # argmax Tumor below t: kept


def test_bad_metric_inputs() -> None:
    with pytest.raises(InputError, match="empty"):
        metrics.classification_metrics(np.array([]), np.array([]), np.zeros((0, 4)), CLASSES)
    with pytest.raises(InputError, match="outside"):
        metrics.classification_metrics(np.array([4]), np.array([0]), np.zeros((1, 4)), CLASSES)
