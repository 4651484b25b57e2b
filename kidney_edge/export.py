"""Export a trained model to ONNX with its spec inside, prove parity with PyTorch, add INT8.

``export_model(RUN_OR_CHECKPOINT, OUT)`` writes ``OUT/model.onnx`` (input ``input`` float32
(N, 3, S, S) with a dynamic batch axis; outputs ``logits``, ``probabilities`` =
softmax(logits / spec.temperature), ``features`` (N, F) pooled penultimate features and
``block_stats`` (N, T) channel statistics of three backbone blocks and ``cam`` (N, C, h, w)
class activation maps), checks PyTorch against onnxruntime on real
preprocessed test images at a batch size other than the export's, then (by default) writes
``OUT/model.int8.onnx`` and keeps it only when it passes the accuracy gate. The run's OOD
detector goes into both files' metadata, each with a threshold chosen on its own validation
scores. All figures go to ``OUT/parity.json``.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import EmptySplitError, InputError, KidneyEdgeError, enum_choice
from kidney_edge.imaging import map_batches
from kidney_edge.io_utils import atomic_write_json
from kidney_edge.layout import BEST_CHECKPOINT, LAST_CHECKPOINT, SPLITS_FILE
from kidney_edge.ood import ONNX_OOD_KEY, OOD_FILE, OodDetector
from kidney_edge.quantize import MIN_CALIBRATION_IMAGES, QuantizationConfig
from kidney_edge.runtime import OnnxClassifier, cpu_isa, scan_images
from kidney_edge.runtime.layout import (
    EXPORT_ROOT,
    INT8_FILE,
    MODEL_FILE,
    PARITY_FAILED_MODEL_FILE,
    PARITY_FILE,
    REJECTED_INT8_FILE,
    UNVERIFIED_INT8_FILE,
    UNVERIFIED_MODEL_FILE,
)
from kidney_edge.spec import GRAPH_OUTPUTS, ONNX_METADATA_KEY, OOD_SCORE, ModelSpec

log = logging.getLogger(__name__)

EXPORT_BATCH_SIZE = 1  # parity is then checked at another batch size, through the dynamic axis
# Parity thresholds: fp32 ONNX must reproduce PyTorch, not merely come close. It computes the
# same operations, so only float reassociation separates them: recorded Lite0 exports reach a
# max |dp| of 5e-6 (benchmarks/results/int8.md).
MAX_ABS_DIFF_PROBABILITIES = 1e-4
MIN_ARGMAX_AGREEMENT = 1.0
MIN_OPSET = 17

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class Exporter(str, Enum):
    """Which torch.onnx exporter writes the graph (both are then simplified, see :func:`_simplify`).

    ``torchscript`` (``dynamo=False``) is the default, by measurement on torch 2.14.1, 2 busy
    cores: it exports Lite0 or B0 in ~1-3 s against 16-50 s for dynamo, and writes opset 17
    directly (dynamo implements opset >= 18 only; its down-conversion to 17 fails). Its raw
    Lite0 graph is messy (452 nodes: "same" padding as constant subgraphs + Pad), but after
    onnxruntime's basic optimiser it has exactly the ops of dynamo's graph (49 Conv, 33 Clip,
    9 Add, pool, Gemm, Div, Softmax) and runs equally fast. ``dynamo`` stays selectable
    (opset >= 18), and export falls back to it when the deprecated TorchScript exporter fails.
    """

    TORCHSCRIPT = "torchscript"
    DYNAMO = "dynamo"


@dataclass(frozen=True)
class ExportConfig:
    """Options of ``kidney-edge export``; messages name the CLI flags."""

    int8: bool = True
    allow_int8_drop: bool = False
    splits: Path | None = None
    images: tuple[Path, ...] = ()
    calibration_images: int = MIN_CALIBRATION_IMAGES
    opset: int = MIN_OPSET
    parity_batch_size: int = 8
    max_parity_images: int = 256
    exporter: Exporter = Exporter.TORCHSCRIPT
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    ood: bool = True  # carry the run's OOD detector (fitted here for runs that have none)
    seed: int = 0

    def __post_init__(self) -> None:
        import onnx

        set_ = object.__setattr__
        set_(self, "images", tuple(Path(p) for p in self.images))
        if self.splits is not None:
            set_(self, "splits", Path(self.splits))
        set_(self, "exporter", enum_choice(Exporter, self.exporter, "--exporter"))
        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= self.opset <= newest:
            raise InputError(f"--opset must be in {MIN_OPSET}..{newest} (this onnx), got {self.opset}")
        if self.calibration_images < 1:
            raise InputError(f"--calibration-images must be >= 1, got {self.calibration_images}")
        if not 2 <= self.parity_batch_size <= 256:
            # Batch 1 is the export's own batch size: parity there would not test the dynamic axis.
            raise InputError(f"--parity-batch-size must be in 2..256, got {self.parity_batch_size}")
        if self.max_parity_images < 1:
            raise InputError(f"--parity-images must be >= 1, got {self.max_parity_images}")
        if self.splits is not None and not self.splits.is_file():
            raise InputError(f"--splits {self.splits} does not exist; pass the run's splits.csv")


@dataclass
class ExportResult:
    """What an export wrote. ``int8_path`` is None when INT8 was off or rejected by the gate."""

    out_dir: Path
    model_path: Path
    parity_path: Path
    spec: ModelSpec
    parity: dict[str, Any]
    int8_path: Path | None = None
    rejected_int8_path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def int8_gate(self) -> dict[str, Any] | None:
        return self.parity.get("int8")


# --------------------------------------------------------------------------- source and images


def resolve_source(source: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """RUN folder -> (RUN/best.pt, RUN/splits.csv or None); checkpoint file -> (file, None)."""
    source = Path(source)
    if source.is_dir():
        checkpoint = source / BEST_CHECKPOINT
        if not checkpoint.is_file():
            raise InputError(
                f"{source} has no {BEST_CHECKPOINT}; pass a run folder written by `kidney-edge train` or a checkpoint file"
            )
        splits = source / SPLITS_FILE
        return checkpoint, splits if splits.is_file() else None
    if source.suffix.lower() == ".onnx":
        raise InputError(f"{source} is already ONNX; export takes a run folder or a .pt checkpoint")
    if not source.is_file():
        raise InputError(f"{source}: no such run folder or checkpoint file")
    return source, None


def default_out_dir(
    source: str | os.PathLike[str], export_root: str | os.PathLike[str] = EXPORT_ROOT
) -> Path:
    """export/<run name> for RUN or RUN/best.pt; export/<file stem> for another checkpoint file."""
    source = Path(source).resolve()
    if source.is_dir():
        return Path(export_root) / source.name
    return Path(export_root) / (source.parent.name if source.stem in (Path(BEST_CHECKPOINT).stem, Path(LAST_CHECKPOINT).stem) else source.stem)


@dataclass
class EvaluationImages:
    """Images export runs on: parity + accuracy gate (test) and INT8 calibration (train)."""

    test_paths: list[Path]
    test_labels: np.ndarray | None  # (N,) class indices in spec order; None without a labelled split
    calibration_paths: list[Path]
    origin: str  # where they came from, for parity.json
    warnings: list[str] = field(default_factory=list)


def select_images(
    splits: Path | None, images: Sequence[Path], spec: ModelSpec, seed: int = 0
) -> EvaluationImages:
    """Test and train images from ``splits`` (a splits.csv), else the given image files/folders."""
    if splits is not None:
        return _images_from_splits(splits, spec, seed)
    if images:
        paths = _expand_images(images)
        note = (
            f"no splits.csv: parity and INT8 calibration use the {len(paths)} --images, and the INT8 "
            "gate compares with the fp32 model's own decisions (no labels)"
        )
        log.info(note)
        return EvaluationImages(paths, None, _shuffled(paths, seed), f"--images ({len(paths)} files)", [note])
    raise InputError(
        "export checks parity on real images, but this checkpoint has no run folder with splits.csv: "
        "pass --splits RUN/splits.csv or --images FOLDER"
    )


def _images_from_splits(splits: Path, spec: ModelSpec, seed: int) -> EvaluationImages:
    from kidney_edge.dataset import read_splits

    rows = read_splits(splits)
    test = [row for row in rows if row.split == "test"]
    if not test:
        raise InputError(f"{splits} has no test rows; export needs a test split for parity and the INT8 gate")
    unknown = sorted({row.label for row in test} - set(spec.class_names))
    if unknown:
        raise InputError(
            f"{splits}: labels {unknown} are not among the model's classes {list(spec.class_names)}; "
            "pass the splits.csv of the run that trained this model"
        )
    labels = np.array([spec.class_names.index(row.label) for row in test], dtype=np.int64)
    train = _shuffled([row.path for row in rows if row.split == "train"], seed)
    origin = f"{splits} (test split: {len(test)} images; train split: {len(train)} images)"
    return EvaluationImages([row.path for row in test], labels, train, origin)


def _expand_images(images: Sequence[Path]) -> list[Path]:
    paths: list[Path] = []
    for item in images:
        if Path(item).is_dir():
            paths.extend(scan_images(item))
        elif Path(item).is_file():
            paths.append(Path(item))
        else:
            raise InputError(f"--images {item}: no such file or folder")
    if not paths:
        raise InputError(f"--images {', '.join(map(str, images))}: no image files found")
    return paths


def _shuffled(paths: Sequence[Path], seed: int) -> list[Path]:
    # Calibration and parity take the first N: shuffle so that N covers every class.
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    return shuffled


# --------------------------------------------------------------------------- torch -> ONNX


def load_checked_model(checkpoint: Path) -> tuple[Any, ModelSpec]:
    """Load a checkpoint in eval mode and check that its head matches the spec's classes."""
    import torch

    from kidney_edge.checkpoint import load_model

    model, spec = load_model(checkpoint)
    model.eval()  # a module left in train mode is the classic cause of export/PyTorch disagreement
    size = spec.input_size
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, 3, size, size))
    except RuntimeError as exc:
        raise InputError(
            f"{checkpoint}: the model does not run on (1, 3, {size}, {size}) input: {exc}"
        ) from None
    if logits.ndim != 2 or logits.shape[1] != spec.num_classes:
        raise InputError(
            f"{checkpoint}: the model outputs shape {tuple(logits.shape)} but the spec lists "
            f"{spec.num_classes} classes {list(spec.class_names)}; the checkpoint is inconsistent"
        )
    return model, spec


def onnx_module(model: Any, temperature: float) -> Any:
    """Wrap ``model`` so the graph outputs :data:`~kidney_edge.spec.GRAPH_OUTPUTS`: logits,
    softmax(logits / temperature), pooled features, block statistics (what the OOD detector
    scores) and class activation maps."""
    import torch

    class OnnxHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # x: (N, 3, S, S)
            feature_map, block_stats = self.model.forward_with_block_stats(x)  # (N, F, h, w), (N, T)
            features = self.model.pool_features(feature_map)  # (N, F)
            logits = self.model.forward_head(features)  # (N, C)
            scaled = logits if temperature == 1.0 else logits / temperature
            # CAM (Zhou et al. 2016): the classifier's weights applied at every position of the
            # feature map; its spatial mean plus the bias is the logit. (N, C, h, w)
            weight = self.model.classifier.weight[:, :, None, None]
            cam = torch.nn.functional.conv2d(feature_map, weight)
            return logits, torch.softmax(scaled, dim=1), features, block_stats, cam

    return OnnxHead().eval()


def export_onnx(
    model: Any,
    spec: ModelSpec,
    path: Path,
    *,
    opset: int = MIN_OPSET,
    exporter: Exporter = Exporter.TORCHSCRIPT,
) -> dict[str, Any]:
    """Write ``model`` (already eval) as checked ONNX with the spec in metadata; returns export facts."""
    import time

    import onnx
    import torch

    from kidney_edge.io_utils import atomic_write_bytes

    wrapper = onnx_module(model, spec.temperature)
    dummy = torch.zeros(EXPORT_BATCH_SIZE, 3, spec.input_size, spec.input_size)  # (1, 3, S, S)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".export.", dir=path.parent) as tmp:
        raw = Path(tmp, "raw.onnx")
        used, used_opset = _torch_export(wrapper, dummy, raw, exporter, opset)
        proto = _simplify(raw, Path(tmp, "simplified.onnx"))
    _check_graph(proto, spec)
    _add_metadata(proto, spec, f"torch {torch.__version__} ({used.value} exporter)")
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(path, proto.SerializeToString())
    return {
        "exporter": used.value,
        "opset": used_opset,
        "export_batch_size": EXPORT_BATCH_SIZE,
        "export_seconds": round(time.perf_counter() - started, 2),
        "torch": torch.__version__,
        "onnx_nodes": len(proto.graph.node),
    }


def _torch_export(
    wrapper: Any, dummy: Any, raw: Path, exporter: Exporter, opset: int
) -> tuple[Exporter, int]:
    names = {"input_names": ["input"], "output_names": list(GRAPH_OUTPUTS)}
    if exporter is Exporter.TORCHSCRIPT:
        try:
            _export_torchscript(wrapper, dummy, raw, opset, names)
            return exporter, opset
        except Exception as exc:  # the legacy exporter is deprecated: fall back rather than fail
            log.warning("TorchScript ONNX exporter failed (%s: %s); trying dynamo", type(exc).__name__, exc)
    dynamo_opset = max(opset, 18)  # dynamo implements opset >= 18 only
    try:
        _export_dynamo(wrapper, dummy, raw, dynamo_opset, names)
    except Exception as exc:
        raise KidneyEdgeError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    return Exporter.DYNAMO, dynamo_opset


def _export_torchscript(wrapper: Any, dummy: Any, raw: Path, opset: int, names: dict[str, list[str]]) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice is for torch developers, not users
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(raw),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            dynamic_axes={name: {0: "batch"} for name in ("input", *GRAPH_OUTPUTS)},
            **names,
        )


def _export_dynamo(wrapper: Any, dummy: Any, raw: Path, opset: int, names: dict[str, list[str]]) -> None:
    import contextlib
    import io

    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library never prints: dynamo reports its steps on stdout
        program = torch.onnx.export(
            wrapper, (dummy,), None, dynamo=True, opset_version=opset, dynamic_shapes=({0: batch},), **names
        )
        program.save(str(raw), external_data=False)


def _simplify(raw: Path, simplified: Path) -> Any:
    """onnxruntime's hardware-independent (basic) optimiser: constant folding, Pad/BN-into-Conv.

    The TorchScript exporter spells TF-style "same" padding as a 7-node constant subgraph plus
    a Pad per conv (452 nodes for Lite0); after this pass Lite0 is 97 standard ONNX nodes
    (Conv, Clip, Add, GlobalAveragePool, Flatten, Gemm, Div, Softmax), the same ops dynamo
    writes. Basic level only emits ONNX-domain ops, so other runtimes read the result too.
    """
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(simplified)
    options.log_severity_level = 3
    ort.InferenceSession(str(raw), sess_options=options, providers=["CPUExecutionProvider"])
    proto = onnx.load(str(simplified))
    used = {node.domain for node in proto.graph.node} | {""}
    kept = [entry for entry in proto.opset_import if entry.domain in used]  # ORT lists every domain it knows
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


def _check_graph(proto: Any, spec: ModelSpec) -> None:
    """Standard ops only, and the I/O contract: input (batch, 3, S, S); outputs (batch, C)."""
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise KidneyEdgeError(
            f"exported graph has non-standard ops {custom}; onnxruntime builds may lack them"
        )
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != ["input"] or outputs != list(GRAPH_OUTPUTS):
        raise KidneyEdgeError(
            f"exported graph has inputs {inputs} and outputs {outputs}; expected input -> {', '.join(GRAPH_OUTPUTS)}"
        )
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    size = spec.input_size
    if len(dims) != 4 or not isinstance(dims[0], str) or dims[1:] != [3, size, size]:
        raise KidneyEdgeError(f"exported input shape is {dims}; expected [batch, 3, {size}, {size}]")


def _add_metadata(proto: Any, spec: ModelSpec, exporter: str) -> None:
    import json

    from kidney_edge import __version__

    del proto.metadata_props[:]
    entries = {
        ONNX_METADATA_KEY: spec.to_json(),  # everything predict needs: preprocessing, classes, decision
        "class_names": json.dumps(list(spec.class_names)),  # for tools that do not know kidney-edge
        "kidney_edge.outputs": (
            "logits: raw scores; probabilities: softmax(logits / temperature); features: pooled "
            "penultimate features; block_stats: channel means and stds of three backbone blocks (OOD "
            "detector input); cam: class activation maps (classifier weights on the last feature map)"
        ),
        "kidney_edge.exporter": exporter,
    }
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.producer_version = "kidney-edge", __version__
    proto.doc_string = (
        f"kidney-edge {spec.arch} CT slice classifier ({', '.join(spec.class_names)}), input "
        f"{spec.input_size}px; spec JSON in metadata_props[{ONNX_METADATA_KEY!r}]."
    )


# --------------------------------------------------------------------------- parity


def check_parity(
    model: Any,
    spec: ModelSpec,
    onnx_path: Path,
    paths: Sequence[Path],
    *,
    batch_size: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """PyTorch vs onnxruntime on the same preprocessed images, at ``batch_size``; ``passed`` per thresholds."""
    import torch

    if not paths:
        raise InputError("parity needs at least one image")
    onnx_logits, onnx_probabilities = OnnxClassifier(onnx_path).predict_files(paths, batch_size)
    wrapper = onnx_module(model, spec.temperature)

    def run_torch(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (n, 3, S, S) float32
        with torch.no_grad():
            logits, probabilities, *_ = wrapper(torch.from_numpy(batch))
        return logits.numpy(), probabilities.numpy()

    on_batch = None if progress is None else (lambda done, total: progress("parity", done, total))
    torch_outputs = map_batches(paths, spec, batch_size, run_torch, on_batch)
    torch_logits = np.concatenate([logits for logits, _ in torch_outputs])  # (N, C)
    torch_probabilities = np.concatenate([probabilities for _, probabilities in torch_outputs])
    diff_probabilities = float(np.abs(torch_probabilities - onnx_probabilities).max())
    diff_logits = float(np.abs(torch_logits - onnx_logits).max())
    same_argmax = int((torch_logits.argmax(1) == onnx_logits.argmax(1)).sum())
    same_decision = int((spec.decide(torch_probabilities) == spec.decide(onnx_probabilities)).sum())
    n = len(paths)
    result = {
        "n_images": n,
        "batch_size": batch_size,
        "max_abs_diff": diff_probabilities,
        "max_abs_diff_logits": diff_logits,
        "argmax_agreement": same_argmax / n,
        "decision_agreement": same_decision / n,
        "thresholds": {"max_abs_diff": MAX_ABS_DIFF_PROBABILITIES, "argmax_agreement": MIN_ARGMAX_AGREEMENT},
    }
    result["passed"] = bool(
        diff_probabilities <= MAX_ABS_DIFF_PROBABILITIES
        and result["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT
    )
    return result


# --------------------------------------------------------------------------- orchestration


def export_model(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: ExportConfig | None = None,
    *,
    progress: Progress | None = None,
) -> ExportResult:
    """Export RUN (best.pt + splits.csv) or a checkpoint to ``out_dir`` under ``config`` (default:
    :class:`ExportConfig`'s defaults); see the module docstring.

    Raises KidneyEdgeError when parity fails, or when INT8 fails the accuracy gate without
    ``allow_int8_drop`` (``model.onnx`` is then kept, parity.json says why).
    """
    config = config or ExportConfig()
    checkpoint, run_splits = resolve_source(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, spec = load_checked_model(checkpoint)
    images = select_images(config.splits or run_splits, config.images, spec, config.seed)
    result = ExportResult(out_dir, out_dir / MODEL_FILE, out_dir / PARITY_FILE, spec, {})
    result.parity = {"source": str(source), "checkpoint": str(checkpoint), "images": images.origin}
    result.warnings.extend(images.warnings)
    _export_verified(model, spec, images, config, result, progress)
    splits = config.splits or run_splits
    detector = None
    if config.ood:
        detector = _file_detector(result.model_path, _run_detector(checkpoint), splits, result, progress)
    try:
        if config.int8:  # quantizes the graph before the detector's nodes join it
            _export_int8(spec, images, config, result, progress)
    finally:
        if detector is not None:
            result.parity["ood"] = _install_ood(result.model_path, detector, splits).record()
            atomic_write_json(result.parity_path, result.parity)
    if detector is not None and result.int8_path is not None:
        int8_detector = _file_detector(result.int8_path, detector, splits, result, progress, refit=True)
        if int8_detector is not None:
            result.parity["int8"]["ood"] = _install_ood(result.int8_path, int8_detector, splits).record()
            atomic_write_json(result.parity_path, result.parity)
    return result


# --------------------------------------------------------------------------- OOD detector


def _run_detector(checkpoint: Path) -> OodDetector | None:
    """The detector the training run fitted (``ood.npz`` beside its checkpoint), if any."""
    sidecar = checkpoint.parent / OOD_FILE
    return OodDetector.from_bytes(sidecar.read_bytes(), where=str(sidecar)) if sidecar.is_file() else None


def _file_detector(
    onnx_path: Path,
    detector: OodDetector | None,
    splits: Path | None,
    result: ExportResult,
    progress: Progress | None,
    *,
    refit: bool = False,
) -> OodDetector | None:
    """The detector for ``onnx_path``, its threshold chosen on this file's own val scores. The fp32
    file keeps the run's ``detector`` (it reproduces the features that was fitted on); with
    ``refit`` (the INT8 file, whose quantized statistics shift) or without a detector (the
    default method) it is fitted on this file's own train outputs."""
    from kidney_edge.evaluation import Predictor, fit_ood_on_splits, load_labelled
    from kidney_edge.ood import DEFAULT_MAX_ID_REJECTION, DEFAULT_OOD_METHOD

    if splits is None:
        result.warnings.append(
            "no OOD detector: it is fitted on the run's train and val splits; export a run folder "
            "or pass --splits RUN/splits.csv"
        )
        return None
    if progress is not None:
        progress(f"ood ({onnx_path.name})", 0, 1)
    predictor = Predictor(onnx_path)
    try:
        if detector is None or refit:
            method, target = (
                (DEFAULT_OOD_METHOD, DEFAULT_MAX_ID_REJECTION)
                if detector is None
                else (detector.method, detector.max_id_rejection)
            )
            return fit_ood_on_splits(predictor, splits, method, target)
        val = load_labelled(splits, "val", class_names=predictor.spec.class_names)
        return detector.with_threshold(detector.score(predictor.infer(val.paths)))
    except EmptySplitError as exc:
        result.warnings.append(f"no OOD detector: {exc}")
        return None


def _install_ood(onnx_path: Path, detector: OodDetector, splits: Path) -> OodDetector:
    """Write ``detector`` into ``onnx_path``: as graph nodes computing ``ood_score`` when its
    method allows (onnxruntime then scores it with the model's own threads, and other runtimes
    get the score too), with the threshold re-chosen on the graph's own val scores; else as
    metadata for the runtime's numpy scorer. Returns the detector as installed."""
    from kidney_edge.evaluation import Predictor, load_labelled

    if not detector.graph_computable:
        set_metadata(onnx_path, {ONNX_OOD_KEY: detector.to_metadata()})
        return detector
    _append_ood_nodes(onnx_path, detector)
    carried = detector.moved_into_graph()
    set_metadata(onnx_path, {ONNX_OOD_KEY: carried.to_metadata()})
    predictor = Predictor(onnx_path)
    val = load_labelled(splits, "val", class_names=predictor.spec.class_names)
    carried = carried.with_threshold(predictor.infer(val.paths)[OOD_SCORE])
    set_metadata(onnx_path, {ONNX_OOD_KEY: carried.to_metadata()})
    log.info("%s: OOD detector %s", onnx_path.name, carried.describe())
    return carried


def _append_ood_nodes(onnx_path: Path, detector: OodDetector) -> None:
    """Append min over classes of ||input @ whitening - whitened_mean||^2 as output ``ood_score``.

    The whitening matrix is stored as float16 (the detector holds float16-rounded values, so no
    precision is lost) and cast to float32 once, when onnxruntime folds constants.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kidney_edge.io_utils import atomic_write_bytes

    proto = onnx.load(str(onnx_path))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    whitening = detector.params["whitening"].astype(np.float16)  # (D, D)
    means = detector.params["whitened_means"].astype(np.float32)  # (C, D)
    graph = proto.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(whitening, "ood_whitening_f16"),
            numpy_helper.from_array(means[None], "ood_means"),  # (1, C, D)
            numpy_helper.from_array(np.array([1], np.int64), "ood_axis_1"),
            numpy_helper.from_array(np.array([2], np.int64), "ood_axis_2"),
        ]
    )

    def reduce(op: str, source: str, target: str, axis: int) -> Any:
        if opset >= 18:  # axes became an input in opset 18
            return helper.make_node(op, [source, f"ood_axis_{axis}"], [target], keepdims=0, name=target)
        return helper.make_node(op, [source], [target], axes=[axis], keepdims=0, name=target)

    graph.node.extend(
        [
            helper.make_node(
                "Cast", ["ood_whitening_f16"], ["ood_whitening"], to=TensorProto.FLOAT, name="ood_cast"
            ),
            helper.make_node(
                "MatMul", [detector.input_name, "ood_whitening"], ["ood_whitened"], name="ood_whiten"
            ),
            helper.make_node(
                "Unsqueeze", ["ood_whitened", "ood_axis_1"], ["ood_whitened_3d"], name="ood_unsqueeze"
            ),
            helper.make_node(
                "Sub", ["ood_whitened_3d", "ood_means"], ["ood_difference"], name="ood_difference"
            ),
            reduce("ReduceSumSquare", "ood_difference", "ood_squared", 2),  # (N, C)
            reduce("ReduceMin", "ood_squared", OOD_SCORE, 1),  # (N,)
        ]
    )
    graph.output.append(helper.make_tensor_value_info(OOD_SCORE, TensorProto.FLOAT, ["batch"]))
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(onnx_path, proto.SerializeToString())


def set_metadata(onnx_path: Path, entries: dict[str, str]) -> None:
    """Set (add or replace) ``metadata_props`` entries of an ONNX file, atomically."""
    import onnx

    from kidney_edge.io_utils import atomic_write_bytes

    proto = onnx.load(str(onnx_path))
    kept = [(prop.key, prop.value) for prop in proto.metadata_props if prop.key not in entries]
    del proto.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        proto.metadata_props.add(key=key, value=value)
    atomic_write_bytes(onnx_path, proto.SerializeToString())


def _export_verified(
    model: Any,
    spec: ModelSpec,
    images: EvaluationImages,
    config: ExportConfig,
    result: ExportResult,
    progress: Progress | None,
) -> None:
    """Export under a staging name, prove parity, then install as model.onnx (old INT8 files go)."""
    from kidney_edge.io_utils import atomic_write_json

    staging = result.out_dir / UNVERIFIED_MODEL_FILE
    if progress is not None:
        progress("export", 0, 1)
    record = result.parity
    parity_paths = _shuffled(images.test_paths, config.seed)[: config.max_parity_images]
    try:
        record.update(
            model=MODEL_FILE,
            **export_onnx(model, spec, staging, opset=config.opset, exporter=config.exporter),
        )
        record.update(
            check_parity(
                model, spec, staging, parity_paths, batch_size=config.parity_batch_size, progress=progress
            )
        )
    except BaseException:
        staging.unlink(missing_ok=True)  # an unverified graph must not linger beside the real ones
        raise
    if not record["passed"]:
        failed = result.out_dir / PARITY_FAILED_MODEL_FILE
        os.replace(staging, failed)
        record["model"] = failed.name
        atomic_write_json(result.parity_path, record)
        raise KidneyEdgeError(
            f"ONNX parity failed: max |p_torch - p_onnx| = {record['max_abs_diff']:.2e} (limit "
            f"{MAX_ABS_DIFF_PROBABILITIES:.0e}), argmax agreement {record['argmax_agreement']:.2%} (need 100%) "
            f"on {record['n_images']} images; nothing was installed as {MODEL_FILE}, the graph is kept "
            f"as {failed} and the figures in {result.parity_path}"
        )
    for stale in (INT8_FILE, REJECTED_INT8_FILE):  # INT8 files of an earlier export no longer match
        (result.out_dir / stale).unlink(missing_ok=True)
    os.replace(staging, result.model_path)
    atomic_write_json(result.parity_path, record)
    log.info(
        "wrote %s; parity max |dp| %.2e on %d images",
        result.model_path,
        record["max_abs_diff"],
        record["n_images"],
    )


def _export_int8(
    spec: ModelSpec,
    images: EvaluationImages,
    config: ExportConfig,
    result: ExportResult,
    progress: Progress | None,
) -> None:
    """Quantize, gate on test accuracy, install as model.int8.onnx or rename to *.rejected.onnx."""
    from kidney_edge.io_utils import atomic_write_json
    from kidney_edge.quantize import int8_accuracy_gate, quantize_model, require_quantization_tools

    require_quantization_tools()
    calibration = images.calibration_paths[: config.calibration_images]
    if len(calibration) < MIN_CALIBRATION_IMAGES:
        message = (
            f"INT8 calibrated on {len(calibration)} images (fewer than {MIN_CALIBRATION_IMAGES}): "
            "activation ranges may be noisy"
        )
        log.info(message)  # returned in result.warnings and parity.json: the caller shows it
        result.warnings.append(message)
    staging = result.out_dir / UNVERIFIED_INT8_FILE
    calibration_progress = None if progress is None else (lambda d, t: progress("calibration", d, t))
    try:
        recipe = quantize_model(
            result.model_path, staging, calibration, spec, config.quantization, progress=calibration_progress
        )
        if progress is not None:
            progress("int8 gate", 0, 1)
        gate = int8_accuracy_gate(
            result.model_path,
            staging,
            images.test_paths,
            images.test_labels,
            max_drop=config.quantization.max_drop,
        )
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    gate = {"recipe": recipe, **gate, "allowed_drop": config.allow_int8_drop, "cpu": cpu_isa()}
    gate["warnings"] = list(result.warnings)
    accepted = gate["passed"] or config.allow_int8_drop
    target = result.out_dir / (INT8_FILE if accepted else REJECTED_INT8_FILE)
    os.replace(staging, target)
    gate["model"] = target.name
    result.parity["int8"] = gate
    atomic_write_json(result.parity_path, result.parity)
    if accepted:
        result.int8_path = target
        if not gate["passed"]:
            result.warnings.append(
                f"INT8 failed the accuracy gate but was kept (--allow-int8-drop): "
                f"{'; '.join(gate['failures'])}"
            )
        return
    result.rejected_int8_path = target
    raise KidneyEdgeError(
        f"INT8 accuracy gate failed on {gate['n_images']} test images: {'; '.join(gate['failures'])}. "
        f"The fp32 model {result.model_path} is kept (parity passed); the INT8 graph was renamed to "
        f"{target} so nothing loads it by mistake. Figures: {result.parity_path}. Keep it anyway with "
        "--allow-int8-drop, or try another --calibration-method / --int8-activations, or export with --no-int8"
    )
