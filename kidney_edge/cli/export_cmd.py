"""`kidney-edge export`."""

from __future__ import annotations

from kidney_edge.cli._app import app, not_available


@app.command()
def export() -> None:
    """Export a trained run to ONNX (fp32 and INT8) with parity proven against PyTorch."""
    not_available("export", "ONNX export")
