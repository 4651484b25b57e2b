"""`kidney-edge train`."""

from __future__ import annotations

from kidney_edge.cli._app import app, not_available


@app.command()
def train() -> None:
    """Train an EfficientNet classifier in two phases (frozen backbone, then fine-tuning)."""
    not_available("train", "two-phase trainer")
