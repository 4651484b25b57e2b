"""`kidney-edge predict`: classify a folder of images with an ONNX model (no PyTorch).

Exit codes (the command's help states them too): 0 every file was predicted; 3 some files could
not be read (their rows carry an ``error``); 2 nothing could be read, or bad arguments; 1 other
failures; 130 interrupted (every finished row is kept; rerun with ``--resume``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kidney_edge.cli._app import PANEL_EDGE, app, console, err_console, library_errors, progress_bar
from kidney_edge.imaging import SUPPORTED_SUFFIXES
from kidney_edge.runtime import (
    EXIT_NOTHING_READ,
    EXIT_OK,
    EXIT_SOME_FAILED,
    OutputFormat,
    PredictOptions,
    output_columns,
)
from kidney_edge.runtime.dicomweb import TOKEN_ENV
from kidney_edge.runtime.driver import DEFAULT_BATCH_SIZE
from kidney_edge.runtime.precision import Precision
from kidney_edge.runtime.ray_engine import Engine, RayPredictSummary
from kidney_edge.runtime.report_page import ReportOptions
from kidney_edge.runtime.rows import EXIT_SERVER, REPORT_SUFFIX
from kidney_edge.runtime.series import DEFAULT_AGGREGATION, DEFAULT_TOP_K, Aggregation, series_path
from kidney_edge.runtime.triage import DEFAULT_REPORT_MAX

if TYPE_CHECKING:  # pragma: no cover
    from rich.progress import ProgressColumn, Task

    from kidney_edge.runtime import PredictSummary
    from kidney_edge.runtime.series import SeriesSummary


_PACS_PANEL = "DICOMweb source (dicomweb+http://HOST:PORT/ROOT; needs the pacs extra)"
# The file kinds predict reads: the scan's own list.
_IMAGE_KINDS = " ".join(sorted(SUPPORTED_SUFFIXES))
_PREDICT_HELP = f"""Classify every image in a folder with an ONNX model (onnxruntime, no PyTorch).

One row per image, columns {", ".join(output_columns(["<Class>"]))} (one p_ column per class).

Exit codes: {EXIT_OK} every file predicted; {EXIT_SOME_FAILED} some files failed (their rows carry `error`); \
{EXIT_NOTHING_READ} nothing readable, or bad arguments; {EXIT_SERVER} a DICOMweb server could not be reached, \
refused the credentials or rejected a stored SR; 1 other failures; 130 interrupted (finished rows are \
kept: rerun with --resume).
"""


@app.command(rich_help_panel=PANEL_EDGE, help=_PREDICT_HELP)
def predict(
    folder: Annotated[
        str,
        typer.Argument(
            help=f"Folder of images, scanned recursively ({_IMAGE_KINDS}, and DICOM files without a "
            "suffix); or a DICOMweb server, dicomweb+http://HOST:PORT/ROOT; with --engine ray also a "
            "folder every node mounts, or a URI such as s3://bucket/slices.",
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            metavar="PATH",
            help="Export folder (fp32 + INT8) or one .onnx file; default: the newest export/*/.",
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="FILE",
            help="File to write the predictions to, row by row as they come (--format parquet: a folder of parts).",
        ),
    ] = PredictOptions.out,
    fmt: Annotated[
        OutputFormat,
        typer.Option("--format", help="Format of --out; parquet needs --engine ray."),
    ] = PredictOptions.fmt,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help=f"Images per onnxruntime call; default: {DEFAULT_BATCH_SIZE} up to 224 px, as many pixels "
            "per call for larger inputs (2 at 448 px).",
        ),
    ] = PredictOptions.batch_size,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="onnxruntime threads per worker (per Ray actor); default: usable CPUs // workers.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Batches side by side, each decoded and run by its own thread; default: one per usable CPU, up to 8.",
        ),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip files already in --out and append.")] = False,
    series: Annotated[
        bool | None,
        typer.Option(
            "--series/--no-series",
            help="Also one row per DICOM series (study -> series, slices ordered along z) in "
            f"{series_path(PredictOptions.out).name} beside --out; default: when every input is DICOM.",
        ),
    ] = None,
    aggregate: Annotated[
        Aggregation, typer.Option("--aggregate", help="How a series' slice probabilities become its scores.")
    ] = DEFAULT_AGGREGATION,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Slices averaged per class by --aggregate topk.")
    ] = DEFAULT_TOP_K,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            help="Model of an export folder: auto = INT8 when its accuracy gate passed and it measures "
            "faster on this CPU (probe cached beside the models), else fp32; fp32/int8 force one.",
        ),
    ] = PredictOptions.precision,
    ood: Annotated[
        bool,
        typer.Option(
            "--ood/--no-ood",
            help="Label images the model's out-of-distribution detector rejects as `unknown` "
            "(probabilities are still written).",
        ),
    ] = PredictOptions.ood,
    engine: Annotated[
        Engine, typer.Option("--engine", help="local: this process; ray: a pool of Ray Data actors.")
    ] = Engine.LOCAL,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray cluster (auto, ray://host:10001); default: start Ray here."),
    ] = None,
    actors: Annotated[
        int | None, typer.Option("--actors", help="Ray actors, one model each; default: CPUs // --threads.")
    ] = None,
    report: Annotated[
        bool,
        typer.Option(
            "--report",
            help="Also write an offline HTML triage page of every row (flagged first, with activation maps) "
            "when the run ends.",
        ),
    ] = False,
    report_path: Annotated[
        Path | None,
        typer.Option(
            "--report-path",
            metavar="FILE",
            help=f"File of the --report page (implies --report); default: <--out stem>{REPORT_SUFFIX} beside --out.",
        ),
    ] = None,
    report_max: Annotated[
        int,
        typer.Option(
            "--report-max", help="Cards per flagged group, and series strips, on the --report page."
        ),
    ] = DEFAULT_REPORT_MAX,
    study: Annotated[
        list[str] | None,
        typer.Option(
            "--study",
            metavar="UID",
            help="DICOMweb: a StudyInstanceUID to read (repeatable).",
            rich_help_panel=_PACS_PANEL,
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            metavar="DATE",
            help="DICOMweb: studies with a StudyDate on or after DATE.",
            rich_help_panel=_PACS_PANEL,
        ),
    ] = None,
    modality: Annotated[
        str | None,
        typer.Option(
            "--modality",
            help="DICOMweb: read only series of this modality (e.g. CT).",
            rich_help_panel=_PACS_PANEL,
        ),
    ] = None,
    store: Annotated[
        bool,
        typer.Option(
            "--store",
            help="DICOMweb: store one DICOM SR per classified series into its study "
            "(STOW-RS); a series that already carries this model's SR is skipped.",
            rich_help_panel=_PACS_PANEL,
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="DICOMweb: with --store, store new SRs even where this model's are there.",
            rich_help_panel=_PACS_PANEL,
        ),
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=TOKEN_ENV,
            show_default=False,
            show_envvar=True,
            help="DICOMweb: bearer token, or USER:PASSWORD for HTTP Basic; prefer the environment "
            "variable, which stays out of shell history and process lists.",
            rich_help_panel=_PACS_PANEL,
        ),
    ] = None,
) -> None:
    from rich.progress import TimeRemainingColumn

    from kidney_edge.errors import InputError
    from kidney_edge.runtime import predict_folder
    from kidney_edge.runtime.dicomweb import is_dicomweb
    from kidney_edge.runtime.ray_engine import check_engine_options, predict_with_ray
    from kidney_edge.runtime.series import SeriesMode, SeriesOptions, SeriesRule

    with library_errors():
        mode = SeriesMode.AUTO if series is None else SeriesMode.ON if series else SeriesMode.OFF
        wanted = report or report_path is not None
        options = PredictOptions(
            model=model, out=out, fmt=fmt, batch_size=batch_size, threads=threads, workers=workers, resume=resume,
            precision=precision, ood=ood, series=SeriesOptions(mode, SeriesRule(aggregate=aggregate, top_k=top_k)),
            report=ReportOptions(report_path, report_max) if wanted else None,
        )  # fmt: skip
    if is_dicomweb(folder):
        _predict_dicomweb(folder, options, study=study, since=since, modality=modality, store=store, force=force,
                          token=token, engine=engine)  # fmt: skip
    with library_errors():
        if study or since or modality or store or force:
            raise InputError(
                "--study, --since, --modality, --store and --force read from a DICOMweb server: "
                "pass dicomweb+http://HOST:PORT/ROOT instead of a folder"
            )
    with library_errors(), progress_bar(_images_per_second(), TimeRemainingColumn()) as bar:
        task = bar.add_task("predict", total=None)
        engine = check_engine_options(engine, actors=actors, address=address, workers=workers, fmt=fmt)
        advance = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
        if engine is Engine.RAY:
            summary = predict_with_ray(folder, options, actors=actors, address=address, progress=advance)
        else:
            summary = predict_folder(folder, options, progress=advance)
    _render(summary)
    _render_report(summary)
    if summary.series is not None:
        _render_series(summary.series)
    raise typer.Exit(130 if summary.interrupted else summary.exit_code)


def _predict_dicomweb(
    source: str, options: PredictOptions, *, study: list[str] | None, since: str | None, modality: str | None,
    store: bool, force: bool, token: str | None, engine: Engine,
) -> None:  # fmt: skip
    """``predict dicomweb+http://…``: rows, series rows and (``--store``) SRs; exits with the run's code."""
    from rich.progress import TimeRemainingColumn

    from kidney_edge.errors import InputError
    from kidney_edge.runtime.dicomweb import Selection
    from kidney_edge.runtime.pacs import predict_dicomweb
    from kidney_edge.runtime.series import SeriesMode

    with library_errors(), progress_bar(_images_per_second(), TimeRemainingColumn()) as bar:
        series = options.series
        if (
            engine is not Engine.LOCAL
            or (series is not None and series.mode is SeriesMode.OFF)
            or options.fmt is OutputFormat.PARQUET
        ):
            raise InputError(
                "a DICOMweb source runs on the local engine and writes csv/jsonl and series rows "
                "(no --engine ray, --format parquet or --no-series)"
            )
        task = bar.add_task("predict", total=None)
        selection = Selection(studies=tuple(study or ()), since=since, modality=modality)
        summary = predict_dicomweb(
            source, selection, options, store=store, force=force, token=token,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    _render(summary)
    _render_report(summary)
    console.print(f"{summary.studies} studies from {summary.server}", highlight=False)
    if summary.series is not None:
        _render_series(summary.series)
    if summary.store is not None:
        done = summary.store
        console.print(f"SRs stored: {done.stored}, already there: {done.skipped}, failed: {len(done.failures)}",
                      highlight=False)  # fmt: skip
        for series_uid, why in done.failures[:5]:
            err_console.print(
                f"[red]not stored[/] series {series_uid}: {why}", highlight=False, soft_wrap=True
            )
    raise typer.Exit(130 if summary.interrupted else summary.exit_code)


def _render_report(summary: PredictSummary) -> None:
    if summary.report is not None:
        size_mb = summary.report.stat().st_size / 1e6
        console.print(f"triage page -> {summary.report} ({size_mb:.1f} MB)", highlight=False, soft_wrap=True)


def _render_series(summary: SeriesSummary) -> None:
    counts = ", ".join(f"{name} {count}" for name, count in summary.label_counts.items())
    console.print(f"{summary.n_series} series -> {summary.out}: {counts} ({summary.rule})", highlight=False)
    flagged = [row for row in summary.rows if row["error"] or row["warning"]]
    for row in flagged[:5]:
        kind = "[red]error[/]" if row["error"] else "[yellow]warning[/]"
        console.print(
            f"{kind} series {row['series_uid']}: {row['error'] or row['warning']}",
            highlight=False,
            soft_wrap=True,
        )
    if len(flagged) > 5:
        console.print(
            f"... {len(flagged) - 5} more flagged series: see the warning/error columns of {summary.out}"
        )
    if summary.n_non_dicom:
        console.print(
            f"{summary.n_non_dicom} inputs are not DICOM: they belong to no series", highlight=False
        )


def _images_per_second() -> ProgressColumn:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ImagesPerSecond(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("-- img/s" if speed is None else f"{speed:.1f} img/s", style="progress.data.speed")

    return ImagesPerSecond()


def _render(summary: PredictSummary) -> None:
    from rich.table import Table

    table = Table(title=f"Predictions -> {summary.out}", show_header=True)
    table.add_column("label")
    table.add_column("images", justify="right")
    for name, count in summary.class_counts.items():
        table.add_row(name, str(count))
    table.add_row("[red]failed[/]", str(summary.failed))
    if summary.skipped:
        table.add_row("already done (--resume)", str(summary.skipped))
    console.print(table)
    kind = "INT8" if summary.is_int8 else "fp32"
    console.print(f"precision {summary.precision_reason}", highlight=False, soft_wrap=True)
    if summary.precision_warning:
        console.print(f"[yellow]warning[/]: {summary.precision_warning}", highlight=False, soft_wrap=True)
    facts: list[Any] = [
        f"model {summary.model} ({kind}), decision rule: {summary.decision_rule}",
        f"unknown: {summary.ood_detector}"
        if summary.ood_detector
        else "unknown: off (no OOD detector in this model, or --no-ood)",
        f"{summary.processed} images in {summary.wall_s:.2f} s = {summary.images_per_s:.1f} images/s "
        f"(batch {summary.batch_size}, {_engine_in_words(summary)})",
    ]
    for path, error in summary.failures[:5]:
        facts.append(f"[red]failed[/] {path}: {error}")
    if summary.failed > 5:
        facts.append(f"... {summary.failed - 5} more failures: see the `error` column of {summary.out}")
    if summary.interrupted:
        facts.append(f"[yellow]interrupted[/]: finished rows are in {summary.out}; rerun with --resume")
    for line in facts:
        console.print(line, highlight=False, soft_wrap=True)


def _engine_in_words(summary: PredictSummary) -> str:
    if isinstance(summary, RayPredictSummary):
        lost = f", {summary.fatal_files} files killed their worker" if summary.fatal_files else ""
        return f"{summary.actors} actors x {summary.threads} threads on Ray ({summary.address}){lost}"
    return f"{summary.workers} workers x {summary.threads} onnxruntime threads"
