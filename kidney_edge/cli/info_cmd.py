"""`kidney-edge info FILE`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from kidney_edge.cli._app import app, console, library_errors


@app.command()
def info(
    file: Path = typer.Argument(
        ..., help="A model (.onnx, .pt checkpoint) or an image (JPEG, PNG, BMP, TIFF, DICOM)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """Describe a model file (.onnx or checkpoint) or an image file.

    Models: the spec (classes, input size, preprocessing, decision rule), opset, inputs and
    outputs, size, and whether it is INT8. Images: format, size, mode; for DICOM the modality,
    Hounsfield range and the window used.
    """
    from kidney_edge.runtime import describe_file

    with library_errors():
        description = describe_file(file, describe_checkpoint=_checkpoint_reader(file))
    if as_json:
        console.print_json(json.dumps(description, default=str))
        return
    console.print(_as_table(description))


def _checkpoint_reader(file: Path) -> Callable[[Path], dict[str, Any]] | None:
    """The checkpoint layer's reader for a checkpoint file when PyTorch is installed, else None.

    Imported only for checkpoints: ``info`` on ONNX files and images runs without torch.
    """
    from kidney_edge.runtime.describe import CHECKPOINT_SUFFIXES

    if file.suffix.lower() not in CHECKPOINT_SUFFIXES:
        return None
    try:
        from kidney_edge.checkpoint import describe_checkpoint
    except ImportError:
        return None
    return describe_checkpoint


def _as_table(description: dict[str, Any]) -> Table:
    table = Table(title=f"{description['kind']}: {description.get('path', '')}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in description.items():
        if key in ("kind", "path"):
            continue
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                table.add_row(f"{key}.{sub_key}", _fmt(sub_value))
        else:
            table.add_row(key, _fmt(value))
    return table


def _fmt(value: Any) -> str:
    return json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)
