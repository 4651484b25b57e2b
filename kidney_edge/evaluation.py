"""Evaluate a checkpoint or an exported ONNX file on labelled images.

Evaluating the exact artifact that ships is the point, so both paths share everything after
the logits: the same metrics, predictions.csv, report and model card. Probabilities are always
``spec.probabilities(logits)`` (the spec's temperature), labels ``spec.decide`` (its rule).
The end of a training run (:mod:`kidney_edge.training.finalize`) evaluates through
:func:`evaluate_files` too.

Outputs in ``out_dir``: metrics.json, predictions.csv, report.html (+ PNGs), report.md,
model_card.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge import metrics as M
from kidney_edge.dataset import SPLITS
from kidney_edge.errors import InputError
from kidney_edge.imaging import map_batches
from kidney_edge.io_utils import atomic_write_json, atomic_write_text
from kidney_edge.labelled import LabelledFiles, LabelledSplits, class_indices, load_labelled
from kidney_edge.layout import BEST_CHECKPOINT, HISTORY_FILE, METRICS_FILE, PREDICTIONS_FILE
from kidney_edge.ood import (
    DEFAULT_MAX_ID_REJECTION,
    DEFAULT_OOD_METHOD,
    OOD_FILE,
    OodDetector,
    OodMethod,
    fit_detector,
    with_threshold,
)
from kidney_edge.runtime import OnnxClassifier
from kidney_edge.runtime.rows import format_predictions, output_columns, prediction_rows
from kidney_edge.spec import BLOCK_STATS, FEATURES, LOGITS, OOD_SCORE, DecisionRule, ModelSpec, softmax

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
N_BOOTSTRAP = 1000


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of ``kidney-edge evaluate``; messages name the CLI flags."""

    model_path: Path
    data: Path
    out_dir: Path
    split: str = "test"
    tumor_recall: float | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_path", Path(self.model_path))
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.split not in SPLITS:
            raise InputError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.tumor_recall is not None and not 0.0 < self.tumor_recall <= 1.0:
            raise InputError(f"--tumor-recall must be in (0, 1], e.g. 0.98; got {self.tumor_recall}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.model_path.is_file():
            raise InputError(
                f"model {self.model_path} does not exist (pass a checkpoint .pt or a .onnx file)"
            )
        if not self.data.exists():
            raise InputError(f"data {self.data} does not exist (pass an image folder or a splits.csv)")


@dataclass(frozen=True)
class EvaluationResult:
    """What an evaluation wrote, and its metrics."""

    out_dir: Path
    split: str
    n_images: int
    metrics: dict[str, Any]  # the content of metrics.json
    spec: ModelSpec
    files: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------- models


class Predictor:
    """A loaded checkpoint (PyTorch) or ONNX file that turns image files into logits and features.

    ``ood`` is the model's OOD detector: from the ONNX metadata, or the run's ``ood.npz`` beside
    a checkpoint; None when there is none.
    """

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        if not self.path.is_file():
            raise InputError(f"model {self.path} does not exist (pass a checkpoint .pt or a .onnx file)")
        self.torch_model: Any = None
        self.onnx: OnnxClassifier | None = None
        self.ood: OodDetector | None = None
        if self.path.suffix.lower() == ".onnx":
            self.onnx = OnnxClassifier(self.path)
            self.spec: ModelSpec = self.onnx.spec
            self.ood = self.onnx.ood
        else:
            from kidney_edge.checkpoint import load_model

            self.torch_model, self.spec = load_model(self.path)
            sidecar = self.path.parent / OOD_FILE
            if sidecar.is_file():
                self.ood = OodDetector.from_bytes(sidecar.read_bytes(), where=str(sidecar))

    def infer(
        self,
        paths: Sequence[Path],
        batch_size: int = EvaluateConfig.batch_size,
        progress: Progress | None = None,
    ) -> dict[str, np.ndarray]:
        """Graph outputs by name for image files, read and preprocessed in batches by the one
        shared preprocess: ``logits`` (N, C), ``features`` (N, F) and ``block_stats`` (N, T), all
        float32 (an ONNX file exported without the last two gives only logits), and an ONNX
        file's ``ood_score`` (N,) when it carries a detector."""
        if self.onnx is not None:
            outputs = self.onnx.infer_files(
                paths, batch_size, features=True, block_stats=True, progress=progress
            )
            found = {
                LOGITS: outputs.logits,
                FEATURES: outputs.features,
                BLOCK_STATS: outputs.block_stats,
                OOD_SCORE: outputs.ood_scores,  # the file's detector, when on
            }
            return {name: values for name, values in found.items() if values is not None}
        import torch

        model = self.torch_model

        def run(batch: np.ndarray) -> tuple[np.ndarray, ...]:  # (B, 3, S, S) float32
            with torch.inference_mode():
                feature_map, block_stats = model.forward_with_block_stats(torch.from_numpy(batch))
                features = model.pool_features(feature_map)  # (B, F)
                return model.forward_head(features).numpy(), features.numpy(), block_stats.numpy()

        chunks = map_batches(paths, self.spec, batch_size, run, progress)
        if not chunks:
            return {LOGITS: np.zeros((0, self.spec.num_classes), np.float32)}
        joined = (np.concatenate(parts).astype(np.float32) for parts in zip(*chunks, strict=True))
        return dict(zip((LOGITS, FEATURES, BLOCK_STATS), joined, strict=True))

    def logits(
        self,
        paths: Sequence[Path],
        batch_size: int = EvaluateConfig.batch_size,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """(N, C) float32 logits (see :meth:`infer`)."""
        return self.infer(paths, batch_size, progress)[LOGITS]


def predict_files(
    model_path: str | Path, paths: Sequence[str | Path], *, batch_size: int = EvaluateConfig.batch_size
) -> tuple[np.ndarray, ModelSpec]:
    """(N, C) logits of a checkpoint or ONNX model for image files, and the model's spec."""
    predictor = Predictor(Path(model_path))
    return predictor.logits([Path(p) for p in paths], batch_size), predictor.spec


# --------------------------------------------------------------------------- core


def evaluate(
    model_path: str | Path,
    data: str | Path,
    *,
    split: str = EvaluateConfig.split,
    out_dir: str | Path,
    tumor_recall: float | None = None,
    batch_size: int = EvaluateConfig.batch_size,
    progress: Progress | None = None,
) -> EvaluationResult:
    """Evaluate a checkpoint or ONNX file on a folder or one split of a splits.csv.

    Uses the temperature and decision rule stored in the model's spec. With ``tumor_recall``,
    a tumor threshold is chosen on the splits.csv's val split for this report only (the model
    file is not changed).
    """
    config = EvaluateConfig(
        model_path=Path(model_path),
        data=Path(data),
        out_dir=Path(out_dir),
        split=split,
        tumor_recall=tumor_recall,
        batch_size=batch_size,
    )
    return run_evaluate(config, progress=progress)


def run_evaluate(config: EvaluateConfig, progress: Progress | None = None) -> EvaluationResult:
    """:func:`evaluate` for a ready config (what the CLI calls)."""
    predictor = Predictor(config.model_path)
    files = load_labelled(config.data, config.split, class_names=predictor.spec.class_names)
    notes: list[str] = []
    split = config.split
    if config.data.is_dir():
        split = "all"  # a folder has no splits: every image in it is evaluated
        notes.append(
            f"Every image in {config.data} was evaluated: if the model was trained on any of them, "
            "these figures are optimistic. Pass the run's splits.csv to evaluate its test split."
        )
    if config.tumor_recall is not None:
        rule = _rule_from_val(predictor, config, notes)
        predictor.spec = predictor.spec.replace(decision_rule=rule or DecisionRule())
    history = config.model_path.parent / HISTORY_FILE
    return evaluate_files(
        predictor,
        files,
        config.out_dir,
        split=split,
        batch_size=config.batch_size,
        history_csv=history if history.is_file() else None,
        notes=notes,
        progress=progress,
    )


def _rule_from_val(predictor: Predictor, config: EvaluateConfig, notes: list[str]) -> DecisionRule | None:
    if config.data.suffix.lower() != ".csv":
        raise InputError(
            "--tumor-recall chooses a threshold on the validation split: pass DATA as a splits.csv "
            "with val rows, or leave --tumor-recall out to use the rule stored in the model"
        )
    val = load_labelled(config.data, "val", class_names=predictor.spec.class_names)
    logits = predictor.logits(val.paths, config.batch_size)
    rule = M.tumor_decision_rule(
        predictor.spec.probabilities(logits),
        class_indices(val.labels, predictor.spec.class_names),
        predictor.spec.class_names,
        positive_class=predictor.spec.positive_class,
        target_recall=config.tumor_recall,
    )
    if rule is not None:
        notes.append(
            f'Operating point "{rule.describe()}" chosen at evaluation time on the val split of '
            f"{config.data} for recall {config.tumor_recall}; the model file keeps its own rule."
        )
        if config.split == "val":
            notes.append("The threshold was chosen on the split being evaluated: its recall is optimistic.")
    return rule


def evaluate_files(
    predictor: Predictor,
    files: LabelledFiles,
    out_dir: Path,
    *,
    split: str,
    batch_size: int = EvaluateConfig.batch_size,
    history_csv: Path | None = None,
    notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> EvaluationResult:
    """Logits -> metrics.json, predictions.csv and the report for one set of labelled files."""
    from kidney_edge.report import ReportInputs, write_report
    from kidney_edge.series_eval import series_evaluation

    spec = predictor.spec
    outputs = predictor.infer(files.paths, batch_size, progress)
    logits = outputs[LOGITS]  # (N, C)
    y_true = class_indices(files.labels, spec.class_names)
    probabilities = spec.probabilities(logits)  # (N, C) calibrated with the spec's temperature
    decided = spec.decide(probabilities)
    metrics = build_metrics(logits, y_true, spec, files.groups)
    ood_scores = None if predictor.ood is None else predictor.ood.score(outputs)
    metrics["ood"] = ood_record(predictor.ood, ood_scores)
    metrics.update(model=str(predictor.path), data=files.description, split=split, **(extra or {}))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics.update(series_evaluation(files.paths, files.labels, probabilities, spec, out_dir))  # DICOM only
    write_predictions(out_dir / PREDICTIONS_FILE, files, probabilities, spec, ood_scores)
    gallery, gallery_note = _error_gallery(predictor, files, probabilities, decided)
    report = write_report(
        out_dir,
        ReportInputs(
            spec=spec,
            metrics=metrics,
            y_true=y_true,
            probabilities=probabilities,
            model_path=str(predictor.path),
            data_description=files.description,
            split=split,
            history_csv=history_csv,
            audit=files.audit,
            gallery=gallery,
            gallery_note=gallery_note,
            phantom_data=files.phantom,
            notes=tuple(notes),
        ),
    )
    atomic_write_json(out_dir / METRICS_FILE, metrics)
    log.info(
        "evaluated %d images: macro-F1 %.4f, accuracy %.4f (under the rule)",
        len(y_true),
        metrics[HEADLINE_BLOCK]["macro_f1"],
        metrics[HEADLINE_BLOCK]["accuracy"],
    )
    paths = {
        "metrics": out_dir / METRICS_FILE,
        "predictions": out_dir / PREDICTIONS_FILE,
        "report_html": report.html,
        "report_md": report.markdown,
        "model_card": report.model_card,
    }
    return EvaluationResult(out_dir, split, len(y_true), metrics, spec, paths)


HEADLINE_BLOCK = "rule"  # headlines show the labels that predict writes: the spec's rule


def build_metrics(
    logits: np.ndarray, y_true: np.ndarray, spec: ModelSpec, groups: Sequence[str] | None = None
) -> dict[str, Any]:
    """metrics.json content: an ``argmax`` and a ``rule`` block with the same keys.

    ``rule`` holds the figures of the labels written to predictions.csv (the spec's decision
    rule); ``argmax`` those of the most probable class. ``headline`` names the block that
    headlines show. Under an argmax rule the two blocks are equal. With ``groups`` (from a
    splits.csv) each block also holds intervals that resample whole groups (``ci_groups``).
    """
    probabilities = spec.probabilities(logits)
    names = spec.class_names
    argmax = M.classification_metrics(
        y_true, probabilities.argmax(axis=1), probabilities, names, n_bootstrap=N_BOOTSTRAP, groups=groups
    )
    rule = M.classification_metrics(
        y_true, spec.decide(probabilities), probabilities, names, n_bootstrap=N_BOOTSTRAP, groups=groups
    )
    uncalibrated = softmax(logits)
    return {
        "n_samples": argmax["n_samples"],
        "labels": list(names),
        "positive_class": spec.positive_class,
        "headline": HEADLINE_BLOCK,
        "argmax": argmax,
        "rule": rule,
        "temperature": spec.temperature,
        "decision_rule": rule_record(spec.decision_rule),
        "calibration": {
            "temperature": spec.temperature,
            "ece_before": M.expected_calibration_error(uncalibrated, y_true),
            "ece_after": argmax["ece"],
            "nll_before": M.negative_log_likelihood(logits, y_true, 1.0),
            "nll_after": M.negative_log_likelihood(logits, y_true, spec.temperature),
            "reliability_before": M.reliability_bins(uncalibrated, y_true),
        },
        "spec": spec.to_dict(),
    }


def ood_record(detector: OodDetector | None, scores: np.ndarray | None) -> dict[str, Any] | None:
    """metrics.json's ``ood`` block: the detector, and the share of these (in-distribution)
    images it rejects with a 95% Wilson interval. None without a detector."""
    if detector is None or scores is None:
        return None
    from scipy.stats import binomtest

    rejected = int(detector.rejects(scores).sum())
    n = len(scores)
    record: dict[str, Any] = {"detector": detector.record(), "n_images": n, "rejected": rejected}
    if n:
        interval = binomtest(rejected, n).proportion_ci(0.95, method="wilson")
        record.update(rejection_rate=rejected / n, rejection_ci95=[interval.low, interval.high])
    return record


def fit_ood_on_splits(
    predictor: Predictor,
    splits: Path,
    method: OodMethod | str,
    max_id_rejection: float,
    batch_size: int = EvaluateConfig.batch_size,
) -> OodDetector:
    """Fit ``method`` on the train split's features, its threshold on the val split's scores."""
    return _fit_ood(predictor, LabelledSplits.read(splits), method, max_id_rejection, batch_size)


def model_ood_detector(
    model_path: Path,
    splits: LabelledSplits,
    detector: OodDetector | None = None,
    *,
    refit: bool = False,
    batch_size: int = EvaluateConfig.batch_size,
) -> OodDetector:
    """The OOD detector for one model file, its threshold chosen on that file's own val scores.

    ``detector`` is kept as it is (its features must be what this file computes); with
    ``refit`` it is fitted anew, same method and target, on this file's train outputs (a
    quantized file's statistics shift); without one, the default method is fitted.
    EmptySplitError when the train (when fitting) or val split is empty.
    """
    predictor = Predictor(model_path)
    if detector is None or refit:
        method, target = (
            (DEFAULT_OOD_METHOD, DEFAULT_MAX_ID_REJECTION)
            if detector is None
            else (detector.method, detector.max_id_rejection)
        )
        return _fit_ood(predictor, splits, method, target, batch_size)
    val = splits.files("val", predictor.spec.class_names)
    return with_threshold(detector, detector.score(predictor.infer(val.paths, batch_size)))


def _fit_ood(
    predictor: Predictor,
    splits: LabelledSplits,
    method: OodMethod | str,
    max_id_rejection: float,
    batch_size: int,
) -> OodDetector:
    names = predictor.spec.class_names
    train = splits.files("train", names)
    val = splits.files("val", names)
    detector = fit_detector(
        method,
        (predictor.infer(train.paths, batch_size), class_indices(train.labels, names)),
        predictor.infer(val.paths, batch_size),
        len(names),
        max_id_rejection,
    )
    log.info("OOD detector: %s", detector.describe())
    return detector


def rule_record(rule: DecisionRule) -> dict[str, Any]:
    """The rule's fields plus its ``description`` in words, as metrics.json records it."""
    return {
        "kind": rule.kind,
        "positive_class": rule.positive_class,
        "threshold": rule.threshold,
        "target_recall": rule.target_recall,
        "note": rule.note,
        "description": rule.describe(),
    }


def write_predictions(
    path: Path,
    files: LabelledFiles,
    probabilities: np.ndarray,
    spec: ModelSpec,
    ood_scores: np.ndarray | None = None,
) -> None:
    """predictions.csv: predict's schema, labelled (:func:`kidney_edge.runtime.output_columns`).

    ``label`` is the spec's rule and ``argmax_label`` the most probable class: metrics.json's
    ``rule`` and ``argmax`` blocks are recomputed exactly from them. Evaluated images are
    labelled in-distribution data, so ``label`` is never ``unknown`` here: ``ood_score`` and
    metrics.json's ``ood`` block say which of them predict would reject.
    """
    columns = output_columns(spec.class_names, labelled=True)
    rows = prediction_rows(
        [str(p) for p in files.paths], probabilities, spec, true_labels=files.labels, ood_scores=ood_scores
    )
    atomic_write_text(path, format_predictions(rows, columns, header=True))


def _error_gallery(
    predictor: Predictor, files: LabelledFiles, probabilities: np.ndarray, decided: np.ndarray
) -> tuple[list[Any], str]:
    """Most confident errors first, with Grad-CAM overlays when the model is a checkpoint."""
    from kidney_edge.imaging import preprocess_batch, resized_image
    from kidney_edge.report import GALLERY_LIMIT, GalleryItem

    spec = predictor.spec
    y_true = class_indices(files.labels, spec.class_names)
    wrong = np.flatnonzero(decided != y_true)
    if len(wrong) == 0:
        return [], ""
    confidence = probabilities[wrong, decided[wrong]]
    chosen = wrong[np.argsort(-confidence, kind="stable")][:GALLERY_LIMIT]
    heatmaps = None
    if predictor.torch_model is not None:
        from kidney_edge.gradcam import grad_cam

        batch = preprocess_batch([files.paths[i] for i in chosen], spec)
        heatmaps = grad_cam(predictor.torch_model, batch, decided[chosen])
    note = (
        f"{len(wrong)} misclassified of {len(y_true)}; showing the {len(chosen)} most confident, "
        "with Grad-CAM for the predicted class."
    )
    if heatmaps is None:
        note += f" Grad-CAM needs the PyTorch checkpoint: evaluate {BEST_CHECKPOINT} to see heatmaps."
    items = []
    for position, index in enumerate(chosen):
        image = resized_image(files.paths[index], spec)
        overlay = None
        if heatmaps is not None:
            from kidney_edge.gradcam import overlay as make_overlay

            overlay = make_overlay(image, heatmaps[position])
        items.append(
            GalleryItem(
                path=files.paths[index],
                true_label=files.labels[index],
                predicted_label=spec.class_names[decided[index]],
                confidence=float(probabilities[index, decided[index]]),
                image=image,
                overlay=overlay,
            )
        )
    return items, note
