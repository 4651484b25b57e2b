"""PyTorch -> ONNX: the checkpoint loaded and checked, the graph's outputs, the TorchScript and
dynamo exporters, onnxruntime's basic simplification and the I/O contract check.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from kidney_edge.errors import InputError, KidneyEdgeError
from kidney_edge.export.config import MIN_OPSET, Exporter
from kidney_edge.export.metadata import add_spec_metadata
from kidney_edge.spec import GRAPH_OUTPUTS, ModelSpec

log = logging.getLogger(__name__)

EXPORT_BATCH_SIZE = 1  # parity is then checked at another batch size, through the dynamic axis


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
            cam = self.model.class_activation_maps(feature_map)  # (N, C, h, w)
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
    add_spec_metadata(proto, spec, f"torch {torch.__version__} ({used.value} exporter)")
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
