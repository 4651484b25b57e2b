"""`kidney-edge info`."""

from __future__ import annotations

from kidney_edge.cli._app import app, not_available


@app.command()
def info() -> None:
    """Describe a model file (.onnx or checkpoint) or an image file (JPEG, PNG, DICOM...)."""
    not_available("info", "info")
