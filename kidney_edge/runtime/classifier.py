"""An exported kidney-edge model on onnxruntime's CPU provider, and the facts about ONNX files.

:class:`OnnxClassifier` reads the model spec from the ONNX file's own metadata, so a ``.onnx``
file alone is enough to preprocess, predict and decide. :func:`int8_operators` is the one test
of whether a graph is quantized; :func:`find_default_model` is where ``predict`` and
``benchmark`` look when no ``--model`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import InputError, KidneyEdgeError
from kidney_edge.imaging import map_batches
from kidney_edge.runtime.hardware import available_cpus
from kidney_edge.runtime.layout import (  # noqa: F401  (re-exported: the runtime's public names)
    EXPORT_ROOT,
    INT8_FILE,
    MODEL_FILE,
    PARITY_FILE,
    REJECTED_INT8_FILE,
)
from kidney_edge.runtime.ood import ONNX_OOD_KEY, OodDetector
from kidney_edge.spec import (
    BLOCK_STATS,
    CAM,
    FEATURES,
    LOGITS,
    ONNX_METADATA_KEY,
    OOD_SCORE,
    PROBABILITIES,
    ModelSpec,
)

# Operators only quantized graphs hold: QDQ (QuantizeLinear/DequantizeLinear), QOperator
# (QLinear*) and dynamic quantization (*Integer). Op types are plain strings in the protobuf.
INT8_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
)
# Graph nodes are serialised before initializers (GraphProto field 1 before field 5), so
# their op types sit in the first bytes even of a large model.
_NODES_HEAD_BYTES = 4 << 20


def int8_operators(model_bytes: bytes) -> list[str]:
    """The :data:`INT8_OPS` whose names occur in (the head of) a serialised ONNX model."""
    return [op for op in INT8_OPS if op.encode() in model_bytes]


def is_int8_model(path: str | os.PathLike[str]) -> bool:
    """Whether the ONNX file at ``path`` is quantized; torch- and onnx-free, reads its head only."""
    with open(path, "rb") as handle:
        return bool(int8_operators(handle.read(_NODES_HEAD_BYTES)))


def session_options(threads: int | None) -> Any:  # -> onnxruntime.SessionOptions
    """Options of every inference session: ``threads`` intra-op threads (default: usable CPUs)."""
    import onnxruntime as ort

    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cpus()
    # One image batch is one graph: parallelism lives inside the operators, so inter-op
    # threads would only compete with intra-op ones for the same cores.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads sleep instead of spin-waiting: a spinning thread steals its core from
    # the decode thread (and from anything else on a small edge box). Measured on the 2-core
    # dev machine under load ~3, Lite0 at batch 8: +20-25% images/s, model-only and end to end.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    return options


@dataclass(frozen=True)
class ModelOutputs:
    """What one batch gives: calibrated probabilities, plus what the graph and detector add."""

    logits: np.ndarray  # (N, C) float32
    probabilities: np.ndarray  # (N, C) float32, temperature-calibrated
    features: np.ndarray | None = None  # (N, D) pooled penultimate features, when asked for
    block_stats: np.ndarray | None = None  # (N, T) block channel statistics, when asked for
    ood_scores: np.ndarray | None = None  # (N,) float64, when the model's OOD detector is on
    unknown: np.ndarray | None = None  # (N,) bool: rejected by the OOD detector
    cam: np.ndarray | None = None  # (N, C, h, w) class activation maps, when asked for


def concat_outputs(outputs: Sequence[ModelOutputs], num_classes: int) -> ModelOutputs:
    """Batches of :class:`ModelOutputs` joined in order (an empty sequence gives N = 0)."""
    if not outputs:
        empty = np.zeros((0, num_classes), dtype=np.float32)
        return ModelOutputs(empty, empty.copy())

    def joined(name: str) -> np.ndarray | None:
        parts = [getattr(o, name) for o in outputs]
        return None if parts[0] is None else np.concatenate(parts)

    return ModelOutputs(**{name: joined(name) for name in ModelOutputs.__dataclass_fields__})


class OnnxClassifier:
    """An exported kidney-edge ONNX model on the CPU execution provider.

    The file must carry its :class:`ModelSpec` in ``metadata_props`` under
    :data:`~kidney_edge.spec.ONNX_METADATA_KEY` (``kidney-edge export`` writes it), and may carry
    an OOD detector under :data:`~kidney_edge.runtime.ood.ONNX_OOD_KEY`; ``ood=False`` ignores it.
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None, ood: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"model file not found: {self.path} (pass --model FILE.onnx)")
        self.threads = threads or available_cpus()
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped exceptions for bad files
            raise InputError(
                f"{self.path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]}); "
                "pass a model.onnx written by `kidney-edge export`"
            ) from None
        metadata = self._session.get_modelmeta().custom_metadata_map
        self.spec = self._read_spec(metadata)
        self._input_name = self._session.get_inputs()[0].name
        self.output_names = tuple(o.name for o in self._session.get_outputs())
        self.ood: OodDetector | None = self._read_ood(metadata) if ood else None
        self.is_int8 = is_int8_model(self.path)

    def _read_spec(self, metadata: dict[str, str]) -> ModelSpec:
        if ONNX_METADATA_KEY not in metadata:
            raise InputError(
                f"{self.path} has no kidney-edge spec in its metadata (key {ONNX_METADATA_KEY!r}); "
                "export the model with `kidney-edge export` so preprocessing travels with it"
            )
        try:
            return ModelSpec.from_json(metadata[ONNX_METADATA_KEY])
        except InputError as exc:
            raise InputError(f"{self.path}: invalid spec in ONNX metadata: {exc}") from None

    def _read_ood(self, metadata: dict[str, str]) -> OodDetector | None:
        if ONNX_OOD_KEY not in metadata:
            return None
        detector = OodDetector.from_metadata(metadata[ONNX_OOD_KEY], where=str(self.path))
        needed = OOD_SCORE if detector.in_graph else detector.input_name
        if needed not in self.output_names:
            raise InputError(
                f"{self.path}: its OOD detector scores a `{needed}` output the graph lacks; "
                "re-export the model, or pass --no-ood"
            )
        return detector

    @property
    def input_size(self) -> int:
        return int(self.spec.input_size)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    @property
    def has_cam(self) -> bool:
        return CAM in self.output_names

    def infer(
        self, batch: np.ndarray, *, features: bool = False, block_stats: bool = False, cam: bool = False
    ) -> ModelOutputs:
        """(N, 3, S, S) float32 -> :class:`ModelOutputs`, with OOD scores when the detector is on.

        Only the outputs needed are fetched: ``features``, ``block_stats`` and ``cam`` on request
        (when the graph has them), and whatever the detector scores.
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        size = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise InputError(f"{self.path}: expected input (N, 3, {size}, {size}), got {batch.shape}")
        asked = {
            LOGITS,
            PROBABILITIES,
            *((FEATURES,) if features else ()),
            *((BLOCK_STATS,) if block_stats else ()),
        }
        if cam:
            asked.add(CAM)
        if self.ood is not None:
            asked.add(OOD_SCORE if self.ood.in_graph else self.ood.input_name)
        wanted = [name for name in self.output_names if name in asked] or [self.output_names[0]]
        try:
            values = self._session.run(wanted, {self._input_name: batch})
        except Exception as exc:
            raise KidneyEdgeError(f"onnxruntime failed on {self.path}: {exc}") from None
        fetched = dict(zip(wanted, values, strict=True))
        logits = np.asarray(fetched.get(LOGITS, values[0]), dtype=np.float32)
        if PROBABILITIES in fetched:
            probabilities = np.asarray(fetched[PROBABILITIES], dtype=np.float32)
        else:  # a logits-only graph: calibrate here from the spec, as the export would have
            probabilities = self.spec.probabilities(logits)
        scores = unknown = None
        if self.ood is not None:
            scores = self.ood.score({**fetched, LOGITS: logits})
            unknown = self.ood.rejects(scores)
        return ModelOutputs(
            logits,
            probabilities,
            fetched.get(FEATURES),
            fetched.get(BLOCK_STATS),
            scores,
            unknown,
            fetched.get(CAM),
        )

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, S, S) float32 -> ((N, C) logits, (N, C) probabilities with temperature applied)."""
        outputs = self.infer(batch)
        return outputs.logits, outputs.probabilities

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, C) calibrated probabilities."""
        return self.infer(batch).probabilities

    def infer_files(
        self,
        paths: Sequence[str | os.PathLike[str]],
        batch_size: int = 16,
        *,
        features: bool = False,
        block_stats: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> ModelOutputs:
        """:meth:`infer` over image files, ``batch_size`` per call, joined in file order.

        Every file goes through the one shared preprocessing; the first unreadable file raises
        ImageReadError (folder predict, which must survive bad files, has its own per-file
        error rows). ``progress(done, total)`` is called after each batch.
        """
        outputs = map_batches(
            list(paths),
            self.spec,
            batch_size,
            lambda batch: self.infer(batch, features=features, block_stats=block_stats),
            progress,
        )
        return concat_outputs(outputs, self.spec.num_classes)

    def predict_files(
        self,
        paths: Sequence[str | os.PathLike[str]],
        batch_size: int = 16,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N, C) logits and (N, C) calibrated probabilities of image files (see :meth:`infer_files`)."""
        outputs = self.infer_files(paths, batch_size, progress=progress)
        return outputs.logits, outputs.probabilities

    def __repr__(self) -> str:
        kind = "int8" if self.is_int8 else "fp32"
        ood = "" if self.ood is None else f", ood={self.ood.method.value}"
        return f"OnnxClassifier({str(self.path)!r}, {kind}, threads={self.threads}{ood})"


def find_default_model(export_root: str | os.PathLike[str] = EXPORT_ROOT) -> Path:
    """The newest ``EXPORT_ROOT/*/model.onnx`` (by modification time)."""
    root = Path(export_root)
    candidates = sorted(root.glob(f"*/{MODEL_FILE}"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not candidates:
        raise InputError(
            f"no model found: {root}/*/{MODEL_FILE} does not exist. Run `kidney-edge demo` to build a small "
            "model, or `kidney-edge export RUN_DIR` for a trained run, or pass --model FILE.onnx"
        )
    return candidates[-1]
