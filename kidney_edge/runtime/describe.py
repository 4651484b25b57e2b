"""``kidney-edge info``: what a file is. ONNX models, checkpoints and images (any supported format).

ONNX files are described without torch, and ``onnx`` (train extra) is optional. Inputs, outputs
and metadata come from onnxruntime; the opset comes from a minimal read of the ModelProto's
top-level protobuf fields (no graph parsing), so it is exact without ``onnx``. INT8-ness is
:func:`~kidney_edge.runtime.classifier.int8_operators` on the file's bytes; with ``onnx``
importable the graph's ops and integer initializers are counted too. Checkpoints need torch, so
the caller passes their reader (the CLI passes :func:`kidney_edge.checkpoint.describe_checkpoint`
when PyTorch is installed): this module never imports the checkpoint layer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kidney_edge.errors import InputError
from kidney_edge.imaging import describe_image, is_image_file
from kidney_edge.runtime.classifier import INT8_OPS, int8_operators
from kidney_edge.runtime.ood import ONNX_OOD_KEY, OodDetector
from kidney_edge.spec import ONNX_METADATA_KEY, ModelSpec

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
# ModelProto field numbers (onnx/onnx.proto3): stable since IR version 3.
_MODEL_OPSET_IMPORT = 8
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2


def describe_file(
    path: str | os.PathLike[str], describe_checkpoint: Callable[[Path], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A plain dict describing ``path``; ``kind`` is ``onnx``, ``checkpoint`` or ``image``.

    Checkpoints (:data:`CHECKPOINT_SUFFIXES`) are described by ``describe_checkpoint``; without
    one, an InputError says what to install.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a model file (.onnx, .pt) or an image file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return {"kind": "onnx", **describe_onnx(path)}
    if suffix in CHECKPOINT_SUFFIXES:
        if describe_checkpoint is None:
            raise InputError(
                f"{path}: describing a checkpoint needs PyTorch: pip install 'kidney-edge[train]'"
            )
        return {"kind": "checkpoint", **describe_checkpoint(path)}
    if not is_image_file(path):
        raise InputError(
            f"{path}: not a model or image file kidney-edge knows (.onnx, .pt, .jpg, .png, .bmp, .tif, .dcm)"
        )
    return {"kind": "image", **describe_image(path)}


def describe_onnx(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A plain dict: path, size_bytes, producer, opset, inputs, outputs, is_int8, spec, metadata."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    session = _session(path)
    meta = session.get_modelmeta()
    custom = dict(meta.custom_metadata_map)
    data = path.read_bytes()
    opsets = _opset_imports(data)
    description: dict[str, Any] = {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "producer": f"{meta.producer_name} {custom.get('kidney_edge.exporter', '')}".strip(),
        "opset": opsets.get("", opsets.get("ai.onnx")),
        "inputs": [_io(arg) for arg in session.get_inputs()],
        "outputs": [_io(arg) for arg in session.get_outputs()],
        **_int8_facts(data),
        "metadata_keys": sorted(custom),
    }
    spec = _spec(path, custom)
    if spec is not None:
        description["decision_rule"] = spec.decision_rule.describe()
        description["spec"] = spec.to_dict()
    if ONNX_OOD_KEY in custom:
        description["ood_detector"] = OodDetector.from_metadata(custom[ONNX_OOD_KEY], str(path)).describe()
    if "kidney_edge.quantization" in custom:
        description["quantization"] = json.loads(custom["kidney_edge.quantization"])
    return description


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # describe, not run
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises untyped errors for unreadable files
        raise InputError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def _io(arg: Any) -> dict[str, Any]:
    return {"name": arg.name, "type": arg.type, "shape": [d if d is not None else "?" for d in arg.shape]}


def _spec(path: Path, custom: dict[str, str]) -> ModelSpec | None:
    if ONNX_METADATA_KEY not in custom:
        return None  # not exported by kidney-edge: describe it anyway
    try:
        return ModelSpec.from_json(custom[ONNX_METADATA_KEY])
    except InputError as exc:
        raise InputError(f"{path}: invalid kidney-edge spec in its metadata: {exc}") from None


def _int8_facts(data: bytes) -> dict[str, Any]:
    found = int8_operators(data)
    try:
        import onnx
    except ImportError:
        return {"is_int8": bool(found), "int8_ops": found, "int8_detected_by": "op names in the file bytes"}
    model = onnx.load_from_string(data)
    ops = [node.op_type for node in model.graph.node]
    integer_types = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return {
        "is_int8": bool(found),
        "int8_ops": {op: ops.count(op) for op in INT8_OPS if op in ops},
        "int8_initializers": sum(1 for t in model.graph.initializer if t.data_type in integer_types),
        "nodes": len(ops),
        "int8_detected_by": "graph ops and initializer types",
    }


def _opset_imports(data: bytes) -> dict[str, int]:
    """{domain: version} from ModelProto.opset_import, reading only top-level fields."""
    opsets = {}
    for number, value in _fields(data):
        if number == _MODEL_OPSET_IMPORT and isinstance(value, bytes):
            entry = dict(_fields(value))
            domain = entry.get(_OPSET_DOMAIN, b"")
            opsets[domain.decode() if isinstance(domain, bytes) else ""] = int(entry.get(_OPSET_VERSION, 0))
    return opsets


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as int, length-delimited as bytes."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
            yield number, value
        elif wire_type == 2:
            length, position = _varint(data, position)
            yield number, data[position : position + length]
            position += length
        elif wire_type in (1, 5):  # fixed64 / fixed32: not in these messages, skip safely
            position += 8 if wire_type == 1 else 4
        else:
            raise InputError(f"not an ONNX protobuf (wire type {wire_type} at byte {position})")


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise InputError("truncated ONNX protobuf")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
