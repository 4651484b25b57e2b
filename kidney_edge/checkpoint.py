"""Checkpoints as plain data: weights + spec + config, loadable with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so loading one
never unpickles arbitrary objects. Layout (format version 1)::

    {"format": "kidney-edge-checkpoint", "format_version": 1,
     "spec": ModelSpec.to_dict(), "config": {...}, "model_state": state_dict,
     ...training state in last.pt: "epoch", "phase", "optimizer", "scheduler", "rng", ...}

Writes are atomic (temp file + rename), so a run killed mid-save keeps the previous file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kidney_edge.errors import InputError
from kidney_edge.io_utils import atomic_path
from kidney_edge.spec import ModelSpec

CHECKPOINT_FORMAT = "kidney-edge-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str = "checkpoint") -> None:
    """Only what ``weights_only=True`` loads without an allow-list; InputError naming the first other value.

    ``config`` and ``extra`` come from the caller, so this is input validation, not an invariant.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise InputError(f"{where}: key {key!r} is not str/int; checkpoints hold plain data only")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    # Exact types: a str subclass such as torch.__version__ would need an allow-list to load.
    elif type(value) not in _PLAIN_SCALARS and not isinstance(value, torch.Tensor):
        raise InputError(
            f"{where}: {type(value).__name__} is not plain data (str, int, float, bool, None, "
            "tensors, lists and dicts of them); convert it, e.g. str(path)"
        )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel / DataParallel wrappers."""
    return model.module if hasattr(model, "module") else model


def _write(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    _check_plain(payload)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    spec: ModelSpec,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s weights with ``spec`` and ``config`` (and ``extra`` training state) atomically."""
    state = {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "spec": spec.to_dict(),
        "config": config,
        "model_state": state,
    }
    payload.update(extra or {})
    _write(path, payload)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a kidney-edge checkpoint safely (``weights_only=True``, tensors on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a zip, or a pickle with non-plain objects
        raise InputError(
            f"{path} is not a readable kidney-edge checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is a PyTorch file but not a kidney-edge checkpoint (no 'format' marker)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise InputError(
            f"{path} has checkpoint format version {version!r}; this kidney-edge reads up to "
            f"{CHECKPOINT_FORMAT_VERSION}: upgrade kidney-edge"
        )
    return payload


def load_model(path: str | os.PathLike[str], device: str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model stored in a checkpoint, in eval mode on ``device``, with its spec."""
    from kidney_edge.backbones import create_model

    payload = load_checkpoint(path)
    spec = ModelSpec.from_dict(payload["spec"])
    model = create_model(spec.arch, num_classes=spec.num_classes, pretrained=False)
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise InputError(f"checkpoint {path}: weights do not fit {spec.arch}: {exc}") from None
    return model.to(device).eval(), spec


def update_spec(path: str | os.PathLike[str], spec: ModelSpec) -> None:
    """Replace the spec stored in checkpoint ``path`` (e.g. after calibration), atomically."""
    payload = load_checkpoint(path)
    payload["spec"] = spec.to_dict()
    _write(path, payload)


def describe_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``kidney-edge info`` shows of a checkpoint: format, spec and its rule, size, progress."""
    path = Path(path)
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
