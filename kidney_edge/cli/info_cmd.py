"""`kidney-edge info FILE` and `kidney-edge info --model PATH`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from kidney_edge.cli._app import PANEL_EDGE, app, console, human_bytes, library_errors, warn_old_spelling
from kidney_edge.imaging import SUPPORTED_SUFFIXES


@app.command(rich_help_panel=PANEL_EDGE)
def info(
    file: Path | None = typer.Argument(
        None,
        help=f"An image to describe ({' '.join(sorted(SUPPORTED_SUFFIXES))}, or DICOM without a suffix).",
        show_default=False,
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        metavar="PATH",
        help="A model to describe: .onnx file, .pt checkpoint (needs torch), or an export folder (its model.onnx).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """Describe a model (--model) or an image file (FILE).

    Models: the spec (classes, input size, preprocessing, decision rule), opset, inputs and
    outputs, size, and whether it is INT8. Images: format, size, mode; for DICOM the modality,
    Hounsfield range and the window used.
    """
    from kidney_edge.errors import InputError
    from kidney_edge.runtime import MODEL_FILE, describe_file

    with library_errors():
        if (file is None) == (model is None):
            raise InputError("give an image FILE or --model PATH (one of them)")
        if model is not None and model.is_dir():
            model = model / MODEL_FILE
        target = model if model is not None else file
        description = describe_file(target, describe_checkpoint=_checkpoint_reader(target))
    if file is not None and description["kind"] != "image":
        warn_old_spelling("info", f"a model as FILE ({file})", f"--model {file}")
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
                table.add_row(f"{key}.{sub_key}", _fmt(sub_key, sub_value))
        else:
            table.add_row(key, _fmt(key, value))
    return table


def _fmt(key: str, value: Any) -> str:
    if key.endswith("_bytes") and isinstance(value, int):
        return human_bytes(value)
    return json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)
