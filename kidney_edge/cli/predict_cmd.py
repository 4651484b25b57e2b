"""`kidney-edge predict`."""

from __future__ import annotations

from kidney_edge.cli._app import app, not_available


@app.command()
def predict() -> None:
    """Classify every image in a folder with an ONNX model (onnxruntime, no PyTorch)."""
    not_available("predict", "edge runtime")
