"""`kidney-edge demo`."""

from __future__ import annotations

from kidney_edge.cli._app import app, not_available


@app.command()
def demo() -> None:
    """Run the whole pipeline on built-in phantom data: synth, split, train, report, export, predict, benchmark."""
    not_available("demo", "demo")
