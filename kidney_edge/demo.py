"""`kidney-edge demo`: the whole product on built-in phantom data, on a CPU, offline.

synth -> leakage-safe split -> two-phase Lite0 training (+ calibration, tumor operating point,
test metrics, report) -> ONNX fp32 + INT8 export with parity and the accuracy gate -> predict
on a held-out folder of new phantom patients -> benchmark. Each stage is timed; the summary is
written to ``OUT/demo_summary.json``. Sized so the full demo takes under 10 minutes on a 2-core
CPU (``benchmarks/results/demo.md``); ``quick`` is a 1-2 minute smoke version.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kidney_edge.errors import InputError
from kidney_edge.io_utils import atomic_write_json
from kidney_edge.layout import (
    BEST_CHECKPOINT,
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_CARD_FILE,
    REPORT_HTML_FILE,
    REPORT_MD_FILE,
    SPLITS_FILE,
)
from kidney_edge.phantoms.classic import DEMO_DIFFICULTY
from kidney_edge.spec import DEFAULT_CLASS_NAMES, UNKNOWN_LABEL

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
# The reference recipe's headline figures (about 97% accuracy, 96% Tumor recall, 96% macro-F1),
# required here under argmax on >= 1,000 slices of held-out phantom patients.
TARGETS = {"accuracy": 0.97, "macro_f1": 0.97, "tumor_recall": 0.97}


@dataclass(frozen=True)
class DemoSize:
    """How big each stage of the demo is. Training runs the library's default recipe; only the
    data, the input size and the time budget are the demo's own."""

    n_images: int
    n_holdout: int
    image_size: int  # model input size
    slice_size: int  # phantom JPEG size
    difficulty: float  # phantom difficulty (see kidney_edge.phantoms.classic)
    slices_per_patient: tuple[int, int]  # fewer near-identical slices: more distinct patients
    class_mix: dict[str, float]
    train_budget_min: float  # --time-budget of the training stage
    bench_iterations: int


# Kaggle's imbalance, softened: at its 11% Stone share a 1,200-image demo would hold only ~45
# training patients with stones. Still imbalanced, so class weighting is exercised.
DEMO_MIX = dict(zip(DEFAULT_CLASS_NAMES, (0.25, 0.35, 0.2, 0.2), strict=True))  # Cyst Normal Stone Tumor
# Sized for a 2-core CPU (benchmarks/results/demo.md): 160 px rather than the default arch's 448
# (each kidney at 80 px rather than 224) buys the default recipe's fine-tuning epochs (the
# findings of a difficulty-0.25 phantom stay visible at that size),
# and the time budget cuts epochs on a slower machine instead of overrunning. The hold-out
# folder of new patients is large enough that one image is 0.1 points.
FULL = DemoSize(n_images=1200, n_holdout=1000, image_size=160, slice_size=512, difficulty=DEMO_DIFFICULTY,
                slices_per_patient=(1, 3), class_mix=DEMO_MIX, train_budget_min=7.0,
                bench_iterations=30)  # fmt: skip
QUICK = DemoSize(n_images=300, n_holdout=16, image_size=64, slice_size=128, difficulty=DEMO_DIFFICULTY,
                 slices_per_patient=(1, 3), class_mix=DEMO_MIX, train_budget_min=1.5,
                 bench_iterations=3)  # fmt: skip


@dataclass(frozen=True)
class DemoConfig:
    # One folder per demo (data, run, export, predictions together), apart from models/ and export/.
    out: Path = Path("runs/demo")
    quick: bool = False
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out {self.out} is a file; pass a folder for the demo's artifacts")
        if self.out.is_dir() and any(self.out.iterdir()) and not self.overwrite:
            raise InputError(
                f"--out {self.out} already holds files; pass --overwrite to replace them or choose another --out"
            )

    @property
    def size(self) -> DemoSize:
        return QUICK if self.quick else FULL


@dataclass
class DemoResult:
    out: Path
    stages: dict[str, float] = field(default_factory=dict)  # wall seconds per stage
    artifacts: dict[str, str] = field(default_factory=dict)
    headline: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    holdout: dict[str, Any] = field(default_factory=dict)
    foreign: dict[str, Any] = field(default_factory=dict)  # label counts on the foreign corpus
    benchmark: dict[str, Any] = field(default_factory=dict)
    targets_met: dict[str, bool] = field(default_factory=dict)  # argmax figures
    # The figures of the decision rule the exported model applies (tumor operating point).
    targets_met_under_rule: dict[str, bool] = field(default_factory=dict)
    phase_val_f1: dict[str, float] = field(default_factory=dict)  # best val macro-F1 of each phase
    warnings: list[str] = field(default_factory=list)  # the training run's honest warnings
    test_metrics: dict[str, Any] = field(default_factory=dict)  # the run's metrics.json

    @property
    def total_s(self) -> float:
        return sum(self.stages.values())

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "total_s": round(self.total_s, 1),
                "stages": {k: round(v, 1) for k, v in self.stages.items()},
                "headline": self.headline, "targets": TARGETS, "targets_met": self.targets_met,
                "targets_met_under_rule": self.targets_met_under_rule,
                "phase_val_macro_f1": self.phase_val_f1, "warnings": self.warnings,
                "parity": self.parity, "holdout": self.holdout, "foreign": self.foreign,
                "benchmark": self.benchmark,
                "artifacts": self.artifacts}  # fmt: skip


def run_demo(config: DemoConfig, progress: Progress | None = None) -> DemoResult:
    """Run every stage in order; returns what was produced and measured (see module docstring)."""
    say = progress or (lambda message: log.info("demo: %s", message))
    size, out = config.size, config.out
    result = DemoResult(out=out)
    out.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def stage(name: str, message: str) -> Iterator[None]:
        say(message)
        started = time.perf_counter()
        yield
        result.stages[name] = time.perf_counter() - started
        atomic_write_json(out / "demo_summary.json", result.to_dict())  # progress survives a crash

    with stage("synth", f"generating {size.n_images} phantom slices"):
        _synthesize(out, size, config.seed)
    with stage("split", "scanning and splitting (duplicates and near-duplicates kept together)"):
        _split(out, config.seed)
    with stage("train", "training EfficientNet-Lite0: head on frozen features, then fine-tuning"):
        _train(out, size, config.seed, say, result)
    with stage("export", "exporting ONNX fp32 + INT8, checking parity and the INT8 accuracy gate"):
        _export(out, result)
    with stage("predict", f"predicting {size.n_holdout} held-out phantom patients with onnxruntime"):
        _predict(out, result)
    with stage("foreign", "predicting foreign inputs (photos, MR, frames, text): expecting `unknown`"):
        _predict_foreign(out, result)
    with stage("benchmark", "benchmarking fp32 and INT8 latency"):
        _benchmark(out, size, result)
    atomic_write_json(out / "demo_summary.json", result.to_dict())
    result.artifacts["summary"] = str(out / "demo_summary.json")
    return result


def _synthesize(out: Path, size: DemoSize, seed: int) -> None:
    from kidney_edge.phantoms.classic import synthesize

    common = {
        "size": size.slice_size,
        "difficulty": size.difficulty,
        "slices_per_patient": size.slices_per_patient,
        "class_mix": size.class_mix,
    }
    synthesize(out / "data", n=size.n_images, seed=seed, **common)
    # New patients from another seed: never seen in training, validation or test.
    synthesize(out / "holdout", n=size.n_holdout, seed=seed + 10_000, **common)


def _split(out: Path, seed: int) -> None:
    from kidney_edge.dataset import SplitConfig, split_dataset

    split_dataset(out / "data", out / SPLITS_FILE, SplitConfig(seed=seed))


def _train(out: Path, size: DemoSize, seed: int, say: Progress, result: DemoResult) -> None:
    from kidney_edge.training import TrainConfig, train

    # The default recipe (TrainConfig's phases), at the demo's input size and time budget.
    config = TrainConfig(data_dir=out / "data", out_dir=out / "run", splits=out / SPLITS_FILE,
                         image_size=size.image_size, seed=seed, device="cpu",
                         time_budget_min=size.train_budget_min)  # fmt: skip
    trained = train(config, progress=_epoch_reporter(say))
    result.warnings = list(trained.metrics.get("warnings", []))
    result.test_metrics = trained.metrics["test"]
    result.headline = headline_figures(result.test_metrics)
    result.targets_met = targets_met(result.headline)
    result.targets_met_under_rule = targets_met_under_rule(result.headline)
    run = trained.run_dir
    result.phase_val_f1 = best_val_f1_per_phase(run / HISTORY_FILE)
    for name in (
        BEST_CHECKPOINT,
        METRICS_FILE,
        REPORT_HTML_FILE,
        REPORT_MD_FILE,
        MODEL_CARD_FILE,
        HISTORY_FILE,
    ):
        if (run / name).exists():
            result.artifacts[name] = str(run / name)


def _epoch_reporter(say: Progress) -> Callable[[Any], None]:
    def report(event: Any) -> None:
        if event.kind in ("plan", "warning"):
            say(f"  {event.message}")
        elif event.kind == "epoch":
            val_f1 = event.metrics.get("val_macro_f1")
            shown = f", val macro-F1 {val_f1:.3f}" if val_f1 is not None else ""
            say(f"  {event.phase} epoch {event.epoch}/{event.epochs}{shown}")

    return report


def _verdicts(figures: dict[str, float | None]) -> dict[str, bool]:
    """Each of :data:`TARGETS` met or not by ``figures`` (a missing figure is not met)."""
    return {name: (figures.get(name) or 0.0) >= target for name, target in TARGETS.items()}


def targets_met(headline: dict[str, Any]) -> dict[str, bool]:
    """The targets judged on the argmax figures of :func:`headline_figures`."""
    return _verdicts(headline["argmax"])


def targets_met_under_rule(headline: dict[str, Any]) -> dict[str, bool]:
    """The same targets judged on the decision rule that the exported model applies.

    The rule's threshold is chosen on validation only, and ``predict`` applies it, so these
    are the figures a user of the exported model gets.
    """
    return _verdicts(headline["rule"])


def best_val_f1_per_phase(history_csv: Path) -> dict[str, float]:
    """Best validation macro-F1 of each phase: shows what fine-tuning adds to the head alone.

    The issue's difficulty rule reads it: a phantom on which the head alone reaches 0.995 is
    too easy for the figures to mean anything.
    """
    best: dict[str, float] = {}
    with open(history_csv, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            best[row["phase"]] = max(best.get(row["phase"], 0.0), round(float(row["val_macro_f1"]), 4))
    return best


def headline_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per decision (``argmax``, ``rule``): per-class recall (positive class first), macro-F1,
    precision, accuracy and the positive class's recall, with CIs, from a metrics.json."""
    figures: dict[str, Any] = {"n_test": metrics["n_samples"], "decision_rule": metrics["decision_rule"]}
    for decision in ("argmax", "rule"):
        figures[decision] = decision_figures(metrics[decision], metrics["positive_class"])
    return figures


def decision_figures(block: dict[str, Any], positive_class: str | None) -> dict[str, Any]:
    """The headline figures of one metrics block (argmax or rule), positive class first."""
    from kidney_edge.report import ordered_classes

    order = ordered_classes(block["labels"], positive_class)
    per_class, ci = block["per_class"], block.get("ci", {})
    return {
        "tumor_recall": (per_class.get(positive_class) or {}).get("recall"),
        "tumor_recall_ci": ci.get(f"recall_{positive_class}"),
        "macro_f1": block["macro_f1"],
        "macro_f1_ci": ci.get("macro_f1"),
        "accuracy": block["accuracy"],
        "accuracy_ci": ci.get("accuracy"),
        "recall": {name: per_class[name]["recall"] for name in order},
        "precision": {name: per_class[name]["precision"] for name in order},
    }


def _export(out: Path, result: DemoResult) -> None:
    from kidney_edge.export import ExportConfig, export_model
    from kidney_edge.runtime.layout import INT8_FILE, MODEL_FILE, PARITY_FILE

    # The gate is recorded, not fatal, here: the demo then deploys fp32 and says why.
    exported = export_model(out / "run", out / "export", ExportConfig(int8=True, allow_int8_drop=True))
    parity = exported.parity
    result.parity = {
        "max_abs_diff": parity.get("max_abs_diff"),
        "argmax_agreement": parity.get("argmax_agreement"),
        "n_images": parity.get("n_images"),
        "int8": parity.get("int8"),
        "ood": parity.get("ood"),  # the fp32 file's OOD detector (the INT8 one is in "int8")
    }
    result.artifacts[MODEL_FILE] = str(exported.model_path)
    result.artifacts[PARITY_FILE] = str(exported.parity_path)
    gate = parity.get("int8") or {}
    if exported.int8_path is not None and gate.get("passed"):
        result.artifacts[INT8_FILE] = str(exported.int8_path)


def _deployed_model(result: DemoResult) -> Path:
    """The INT8 model when it passed the accuracy gate, else fp32: what an edge box would run."""
    from kidney_edge.runtime.layout import INT8_FILE, MODEL_FILE

    return Path(result.artifacts.get(INT8_FILE) or result.artifacts[MODEL_FILE])


def _predict(out: Path, result: DemoResult) -> None:
    from kidney_edge.runtime import OnnxClassifier, PredictOptions, predict_folder

    model = _deployed_model(result)
    predictions = out / "holdout_predictions.csv"
    summary = predict_folder(out / "holdout", PredictOptions(model=model, out=predictions))
    result.artifacts["holdout_predictions.csv"] = str(predictions)
    result.holdout = {"model": model.name, "images": summary.predicted, "failed": summary.failed,
                      "images_per_s": round(summary.images_per_s, 1),
                      **holdout_figures(predictions, OnnxClassifier(model).spec)}  # fmt: skip
    result.holdout["targets_met"] = {d: _verdicts(result.holdout[d]) for d in ("argmax", "rule")}


def _predict_foreign(out: Path, result: DemoResult) -> None:
    from kidney_edge.phantoms.foreign import write_foreign_corpus
    from kidney_edge.runtime import PredictOptions, predict_folder

    folder = out / "foreign"
    write_foreign_corpus(folder)
    predictions = out / "foreign_predictions.csv"
    summary = predict_folder(folder, PredictOptions(model=_deployed_model(result), out=predictions))
    result.artifacts["foreign_predictions.csv"] = str(predictions)
    result.foreign = {"images": summary.total_files, "failed": summary.failed,
                      "labels": dict(summary.class_counts)}  # fmt: skip


def holdout_figures(predictions_csv: Path, spec: Any) -> dict[str, Any]:
    """argmax and rule figures (with CIs) of predict's rows, the truth being each file's class folder.

    The rule's figures score the spec's decision on every row; rows the OOD detector labelled
    unknown are counted apart (``unknown``, ``unknown_rate``): they are in-distribution images
    predict would not have answered.
    """
    import numpy as np

    from kidney_edge.evaluation import class_indices
    from kidney_edge.metrics import classification_metrics

    with open(predictions_csv, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if not row["error"]]
    if not rows:
        raise InputError(f"{predictions_csv}: no predicted rows to score")
    y_true = class_indices([Path(row["path"]).parent.name for row in rows], spec.class_names)
    probabilities = np.array([[float(row[f"p_{c}"]) for c in spec.class_names] for row in rows])
    unknown = sum(row["label"] == UNKNOWN_LABEL for row in rows)
    figures: dict[str, Any] = {"n": len(rows), "unknown": unknown, "unknown_rate": unknown / len(rows)}
    for decision, y_pred in (("argmax", probabilities.argmax(axis=1)), ("rule", spec.decide(probabilities))):
        block = classification_metrics(y_true, y_pred, probabilities, spec.class_names)
        figures[decision] = decision_figures(block, spec.positive_class)
    return figures


def _benchmark(out: Path, size: DemoSize, result: DemoResult) -> None:
    from kidney_edge.runtime import run_benchmark
    from kidney_edge.runtime.layout import MODEL_FILE

    record = run_benchmark(Path(result.artifacts[MODEL_FILE]), batch_sizes=(1, 8),
                           iterations=size.bench_iterations, json_out=out / "benchmark.json")  # fmt: skip
    result.artifacts["benchmark.json"] = str(out / "benchmark.json")
    result.benchmark = {"machine": record.get("machine", {}).get("cpu_model"),
                        "model_only": record.get("model_only")}  # fmt: skip
