"""The edge runtime: an ONNX classifier on onnxruntime, no PyTorch anywhere on this path.

:class:`OnnxClassifier` reads the model spec from the ONNX file's own metadata, so a ``.onnx``
file alone is enough to preprocess, predict and decide. :func:`available_cpus` sizes the
thread pool from the CPUs this process may actually use (affinity and cgroup quota), not from
the host's core count, which over-subscribes containers.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from kidney_edge.errors import InputError, KidneyEdgeError
from kidney_edge.spec import ONNX_METADATA_KEY, ModelSpec

log = logging.getLogger(__name__)

_CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_cpu_limit() -> float | None:
    """CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when unlimited/unknown."""
    try:
        if _CGROUP_V2_CPU_MAX.exists():
            quota, period = _CGROUP_V2_CPU_MAX.read_text().split()[:2]
            if quota == "max":
                return None
            return int(quota) / int(period)
        if _CGROUP_V1_QUOTA.exists() and _CGROUP_V1_PERIOD.exists():
            quota_us = int(_CGROUP_V1_QUOTA.read_text())
            period_us = int(_CGROUP_V1_PERIOD.read_text())
            return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError) as exc:
        log.debug("cannot read the cgroup CPU quota: %s", exc)
    return None


def available_cpus() -> int:
    """CPUs this process may use: min(affinity mask, cgroup quota rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def _session_options(threads: int | None):  # -> onnxruntime.SessionOptions
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
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    return options


class OnnxClassifier:
    """An exported kidney-edge ONNX model on the CPU execution provider.

    The file must carry its :class:`ModelSpec` in ``metadata_props`` under
    :data:`~kidney_edge.spec.ONNX_METADATA_KEY` (``kidney-edge export`` writes it).
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"model file not found: {self.path} (pass --model FILE.onnx)")
        self.threads = threads or available_cpus()
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=_session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped exceptions for bad files
            raise InputError(
                f"{self.path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]}); "
                "pass a model.onnx written by `kidney-edge export`"
            ) from None
        self.spec = self._read_spec()
        self._input_name = self._session.get_inputs()[0].name
        self._output_names = [o.name for o in self._session.get_outputs()]
        self.is_int8 = self._detect_int8()

    def _read_spec(self) -> ModelSpec:
        metadata = self._session.get_modelmeta().custom_metadata_map
        if ONNX_METADATA_KEY not in metadata:
            raise InputError(
                f"{self.path} has no kidney-edge spec in its metadata (key {ONNX_METADATA_KEY!r}); "
                "export the model with `kidney-edge export` so preprocessing travels with it"
            )
        try:
            return ModelSpec.from_json(metadata[ONNX_METADATA_KEY])
        except InputError as exc:
            raise InputError(f"{self.path}: invalid spec in ONNX metadata: {exc}") from None

    def _detect_int8(self) -> bool:
        # Cheap and torch/onnx-free: the export names INT8 files model.int8.onnx, and quantized
        # graphs contain QuantizeLinear nodes whose names survive in the raw protobuf bytes.
        if ".int8" in self.path.name:
            return True
        with open(self.path, "rb") as handle:
            head = handle.read(4 << 20)
        return b"QuantizeLinear" in head or b"QLinearConv" in head

    @property
    def input_size(self) -> int:
        return int(self.spec.input_size)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, S, S) float32 -> ((N, C) logits, (N, C) probabilities with temperature applied)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        size = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise InputError(f"{self.path}: expected input (N, 3, {size}, {size}), got {batch.shape}")
        try:
            values = self._session.run(None, {self._input_name: batch})
            outputs = dict(zip(self._output_names, values, strict=True))
        except Exception as exc:
            raise KidneyEdgeError(f"onnxruntime failed on {self.path}: {exc}") from None
        logits = np.asarray(outputs.get("logits", next(iter(outputs.values()))), dtype=np.float32)
        if "probabilities" in outputs:
            probabilities = np.asarray(outputs["probabilities"], dtype=np.float32)
        else:  # a logits-only graph: calibrate here from the spec, as the export would have
            probabilities = self.spec.probabilities(logits)
        return logits, probabilities

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, C) calibrated probabilities."""
        return self.run(batch)[1]

    def __repr__(self) -> str:
        kind = "int8" if self.is_int8 else "fp32"
        return f"OnnxClassifier({str(self.path)!r}, {kind}, threads={self.threads})"
