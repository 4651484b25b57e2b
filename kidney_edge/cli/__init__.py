"""Command-line interface: ``kidney-edge COMMAND``. One module per command, all thin."""

from __future__ import annotations

from kidney_edge.cli import (  # noqa: F401  (each module registers its command on `app`)
    benchmark_cmd,
    data_cmd,
    demo_cmd,
    evaluate_cmd,
    export_cmd,
    info_cmd,
    predict_cmd,
    serve_cmd,
    train_cmd,
)
from kidney_edge.cli._app import app


def main() -> None:
    app()
