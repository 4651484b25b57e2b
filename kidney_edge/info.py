"""`kidney-edge info`: what a file is. Models (.onnx, checkpoints) and images (any supported format).

ONNX files are described without torch (runtime path); checkpoints need the ``train`` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kidney_edge.errors import InputError
from kidney_edge.spec import ModelSpec

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def describe_file(path: str | Path) -> dict[str, Any]:
    """A plain dict describing ``path``; ``kind`` is ``onnx``, ``checkpoint`` or ``image``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a model file (.onnx, .pt) or an image file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from kidney_edge.onnx_info import describe_onnx

        return {"kind": "onnx", **describe_onnx(path)}
    if suffix in CHECKPOINT_SUFFIXES:
        return {"kind": "checkpoint", **_describe_checkpoint(path)}
    from kidney_edge.imaging import describe_image, is_image_file

    if not is_image_file(path):
        raise InputError(
            f"{path}: not a model or image file kidney-edge knows (.onnx, .pt, .jpg, .png, .bmp, .tif, .dcm)"
        )
    return {"kind": "image", **describe_image(path)}


def _describe_checkpoint(path: Path) -> dict[str, Any]:
    try:
        from kidney_edge.checkpoint import load_checkpoint
    except ImportError:
        raise InputError(
            f"{path}: describing a checkpoint needs PyTorch: pip install 'kidney-edge[train]'"
        ) from None
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("model_state", {})
    spec = checkpoint.get("spec")
    rule = ModelSpec.from_dict(spec).decision_rule.describe() if spec else None
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "format_version": checkpoint.get("format_version"),
        "decision_rule": rule,
        "spec": spec,
        "parameters": int(sum(int(t.numel()) for t in state.values())),
        "epoch": checkpoint.get("epoch"),
        "phase": checkpoint.get("phase"),
    }
