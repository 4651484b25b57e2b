"""The end of a training run: calibrate on val, choose the operating point on val, evaluate test.

What a run stores (the temperature and decision rule in ``best.pt`` and ``spec.json``) and
what it reports (metrics.json, predictions.csv, the report and model card in the run folder)
come from the same :func:`kidney_edge.evaluation.evaluate_files` that ``kidney-edge evaluate``
runs, so a run's test figures and a later evaluation of its checkpoint agree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kidney_edge import metrics as M
from kidney_edge.checkpoint import update_spec
from kidney_edge.errors import EmptySplitError, InputError, KidneyEdgeError
from kidney_edge.evaluation import (
    EvaluateConfig,
    EvaluationResult,
    Predictor,
    class_indices,
    evaluate_files,
    fit_ood_on_splits,
    load_labelled,
    rule_record,
)
from kidney_edge.io_utils import atomic_write_bytes, atomic_write_text
from kidney_edge.layout import BEST_CHECKPOINT, HISTORY_FILE, SPEC_FILE, SPLITS_FILE
from kidney_edge.ood import OOD_FILE, OodDetector, OodMethod
from kidney_edge.spec import DecisionRule, ModelSpec
from kidney_edge.training.config import TrainConfig

log = logging.getLogger(__name__)


def finalize_run(
    run_dir: str | Path,
    *,
    tumor_recall: float | None = TrainConfig.tumor_recall,
    ood_method: OodMethod | str | None = TrainConfig.ood_method,
    ood_max_rejection: float = TrainConfig.ood_max_rejection,
    batch_size: int = EvaluateConfig.batch_size,
    warnings: Sequence[str] = (),
) -> EvaluationResult:
    """Calibrate on val, choose the tumor threshold on val, store both, fit the OOD detector on
    train (threshold on val), then evaluate test.

    The temperature and rule go into the spec of ``best.pt`` and ``spec.json``, the detector into
    ``ood.npz`` beside them; metrics.json, predictions.csv, the report and the model card are
    written into ``run_dir``. ``warnings`` about the training run go into metrics.json and the
    report.
    """
    run_dir = Path(run_dir)
    checkpoint, splits = run_dir / BEST_CHECKPOINT, run_dir / SPLITS_FILE
    for required in (checkpoint, splits):
        if not required.is_file():
            raise KidneyEdgeError(f"cannot finish run {run_dir}: {required.name} is missing")
    predictor = Predictor(checkpoint)
    spec, validation = _calibrate_on_val(predictor, splits, tumor_recall, batch_size)
    update_spec(checkpoint, spec)
    atomic_write_text(run_dir / SPEC_FILE, spec.to_json() + "\n")
    predictor.spec = spec
    if ood_method is not None:
        predictor.ood = _fit_ood(predictor, splits, ood_method, ood_max_rejection, batch_size, run_dir)
        validation["ood"] = None if predictor.ood is None else predictor.ood.record()
    try:
        test = load_labelled(splits, "test", class_names=spec.class_names)
    except InputError as exc:
        raise KidneyEdgeError(
            f"run {run_dir}: no test metrics ({exc}); {BEST_CHECKPOINT} and {SPEC_FILE} hold the calibration"
        ) from None
    history = run_dir / HISTORY_FILE
    return evaluate_files(
        predictor,
        test,
        run_dir,
        split="test",
        batch_size=batch_size,
        history_csv=history if history.is_file() else None,
        notes=[f"Warning: {warning}." for warning in warnings],
        extra={"validation": validation, "warnings": list(warnings)},
    )


def _fit_ood(
    predictor: Predictor,
    splits: Path,
    method: OodMethod | str,
    max_id_rejection: float,
    batch_size: int,
    run_dir: Path,
) -> OodDetector | None:
    """Fit the OOD detector and write it to ``run_dir/ood.npz``; None (and no file) without a
    train or val split."""
    sidecar = run_dir / OOD_FILE
    try:
        detector = fit_ood_on_splits(predictor, splits, method, max_id_rejection, batch_size)
    except EmptySplitError as exc:
        log.warning("no OOD detector: %s", exc)
        sidecar.unlink(missing_ok=True)
        return None
    atomic_write_bytes(sidecar, detector.to_bytes())
    return detector


def _calibrate_on_val(
    predictor: Predictor, splits: Path, tumor_recall: float | None, batch_size: int
) -> tuple[ModelSpec, dict[str, Any]]:
    """Fit the temperature, then the tumor threshold on calibrated val probabilities."""
    spec = predictor.spec
    try:
        val = load_labelled(splits, "val", class_names=spec.class_names)
    except EmptySplitError:
        log.warning("no val split in %s: keeping temperature 1 and the argmax rule", splits)
        return spec.replace(temperature=1.0, decision_rule=DecisionRule()), {"n_samples": 0}
    logits = predictor.logits(val.paths, batch_size)
    y_val = class_indices(val.labels, spec.class_names)
    temperature = M.fit_temperature(logits, y_val)
    spec = spec.replace(temperature=temperature)
    probabilities = spec.probabilities(logits)
    rule = None
    if tumor_recall is not None:
        rule = M.tumor_decision_rule(
            probabilities,
            y_val,
            spec.class_names,
            positive_class=spec.positive_class,
            target_recall=tumor_recall,
        )
    spec = spec.replace(decision_rule=rule or DecisionRule())
    validation = {
        "n_samples": len(y_val),
        "temperature": temperature,
        "nll_before": M.negative_log_likelihood(logits, y_val, 1.0),
        "nll_after": M.negative_log_likelihood(logits, y_val, temperature),
        "decision_rule": rule_record(spec.decision_rule),
    }
    if rule is not None:
        positive = spec.class_names.index(rule.positive_class)
        hits = spec.decide(probabilities)[y_val == positive] == positive
        validation["positive_recall_achieved"] = float(hits.mean())
    log.info("val: temperature %.4f, rule %s", temperature, spec.decision_rule.describe())
    return spec, validation
