"""`kidney-edge evaluate`: clinical metrics, calibration and an HTML report for a checkpoint or ONNX file."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kidney_edge.cli._app import (
    PANEL_MODEL,
    NowOption,
    app,
    console,
    library_errors,
    print_headline,
    progress_bar,
)
from kidney_edge.dataset import SPLITS
from kidney_edge.evaluation import EvaluateConfig
from kidney_edge.layout import METRICS_FILE, PREDICTIONS_FILE

if TYPE_CHECKING:  # pragma: no cover
    from kidney_edge.evaluation import EvaluationResult

Split = Enum("Split", {name: name for name in SPLITS}, type=str)  # choices from the library


@app.command(rich_help_panel=PANEL_MODEL, old_spellings=(NowOption("MODEL", "--model", positionals=2),))
def evaluate(
    data: Annotated[
        Path, typer.Argument(help="Folder with one sub-folder per class, or a splits.csv (see --split).")
    ],
    model: Annotated[
        Path,
        typer.Option(
            "--model", metavar="FILE", help="Checkpoint (best.pt) or exported .onnx file to evaluate."
        ),
    ],
    split: Annotated[
        Split,
        typer.Option(
            "--split", help="Which split of a splits.csv DATA to evaluate (a folder DATA: all of it)."
        ),
    ] = Split(EvaluateConfig.split),
    out: Annotated[
        Path,
        typer.Option(
            "--out", metavar="DIR", help=f"Folder for {METRICS_FILE}, {PREDICTIONS_FILE} and the report."
        ),
    ] = Path("evaluation"),
    tumor_recall: Annotated[
        float | None,
        typer.Option(
            "--tumor-recall",
            help="Choose a Tumor threshold on the splits.csv's val split reaching this recall "
            "(e.g. 0.98); default: the rule stored in the model.",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images per forward pass.")
    ] = EvaluateConfig.batch_size,
) -> None:
    """Evaluate a checkpoint or ONNX model on a split: clinical metrics and an HTML report."""
    from kidney_edge.evaluation import run_evaluate

    with library_errors():
        config = EvaluateConfig(
            model_path=model,
            data=data,
            out_dir=out,
            split=split.value,
            tumor_recall=tumor_recall,
            batch_size=batch_size,
        )
        with progress_bar() as bar:
            task = bar.add_task("evaluate", total=None)
            result = run_evaluate(
                config, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
    _render(result)


def _render(result: EvaluationResult) -> None:
    metrics = result.metrics
    where = "whole folder" if result.split == "all" else f"{result.split} split"
    print_headline(metrics, f"{where}, {result.n_images} images")
    calibration = metrics["calibration"]
    console.print(
        f"temperature {metrics['temperature']:.4f}, ECE {calibration['ece_before']:.3f} (T = 1) "
        f"-> {calibration['ece_after']:.3f}"
    )
    console.print(f"report: {result.files['report_html']}")
