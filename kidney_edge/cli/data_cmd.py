"""`kidney-edge synth` and `kidney-edge split`."""

from __future__ import annotations

from kidney_edge.cli._app import app, not_available


@app.command()
def synth() -> None:
    """Generate a phantom kidney CT dataset in the Kaggle dataset's layout."""
    not_available("synth", "phantom generator")


@app.command()
def split() -> None:
    """Scan a dataset folder and write a leakage-safe 70/15/15 splits.csv with an audit."""
    not_available("split", "dataset split")
