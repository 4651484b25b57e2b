"""The Typer app and the one place that turns library errors into exit codes.

Command modules register on :data:`app`; each command parses options, calls one library
function inside :func:`library_errors`, and renders the result. Library imports happen
inside the command functions so that ``kidney-edge --help`` and the runtime commands never
import torch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress

app = typer.Typer(
    name="kidney-edge",
    help="Kidney CT slice classifier (Normal, Cyst, Stone, Tumor): train, evaluate, export to "
    "ONNX/INT8 and run on CPU-only edge machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def library_errors() -> Iterator[None]:
    """Run library code; a KidneyEdgeError becomes one line on stderr and its exit code."""
    from kidney_edge.errors import KidneyEdgeError

    try:
        yield
    except KidneyEdgeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


def progress_bar(*extra_columns: object) -> Progress:
    """The CLI's progress bar: description, bar, n/total, elapsed, then ``extra_columns``."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *extra_columns,
        console=console,
        transient=True,
    )


def print_headline(metrics: dict[str, Any], title: str) -> None:
    """The headline figures (positive class first) with CIs, saying which labels they are of,
    then argmax vs the decision rule when the rule is not argmax."""
    from rich.table import Table

    from kidney_edge.report import (
        HEADLINE_HEADER,
        RULE_COMPARISON_HEADER,
        headline_caption,
        headline_rows,
        rule_comparison_rows,
    )

    table = Table(title=f"{title}, {headline_caption(metrics)}")
    for column in HEADLINE_HEADER:
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in headline_rows(metrics):
        table.add_row(*row)
    console.print(table)
    comparison = rule_comparison_rows(metrics)
    if comparison:
        rule_table = Table(title="argmax vs the decision rule")
        for column in RULE_COMPARISON_HEADER:
            rule_table.add_column(column, justify="left" if column == "figure" else "right")
        for row in comparison[:3] + comparison[-2:]:  # positive recall/precision/specificity, macro-F1, accuracy
            rule_table.add_row(*row)
        console.print(rule_table)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the library's log messages."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
