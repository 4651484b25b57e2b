"""`kidney-edge evaluate`."""

from __future__ import annotations

from kidney_edge.cli._app import app, not_available


@app.command()
def evaluate() -> None:
    """Evaluate a checkpoint or ONNX model on a split: clinical metrics and an HTML report."""
    not_available("evaluate", "evaluation and report")
