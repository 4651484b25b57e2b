"""`kidney-edge benchmark`."""

from __future__ import annotations

from kidney_edge.cli._app import app, not_available


@app.command()
def benchmark() -> None:
    """Measure model latency and throughput with onnxruntime on this CPU."""
    not_available("benchmark", "benchmark")
