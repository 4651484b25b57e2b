"""The predict driver: everything a predict run does around "classify these files", for every engine.

:func:`run_predict` owns the order of a run: load the model under ``--precision`` (while the
files are listed), derive the columns, drop the files already in ``--out`` (``--resume``), build
the summary, stream rows to the writer as they come, turn Ctrl-C into ``summary.interrupted``,
and with ``--report`` keep the triage page's pictures while rows stream. When the rows are done
it reads them back once, assesses the DICOM series once (``--series``) for the series rows
(:mod:`~kidney_edge.runtime.series`) and writes the page of every row with those series
(:mod:`~kidney_edge.runtime.report_page`). An engine
(:class:`PredictEngine`) supplies only the rows: the local thread pool
(:class:`~kidney_edge.runtime.predict.LocalEngine`) or a pool of Ray actors
(:class:`~kidney_edge.runtime.ray_engine.RayEngine`). A new engine implements one method and
calls :func:`run_predict`; it gets resume, summaries, output formats and interrupts as they are.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kidney_edge.errors import InputError, KidneyEdgeError
from kidney_edge.runtime.classifier import OnnxClassifier
from kidney_edge.runtime.precision import Precision, PrecisionChoice, Probe, resolve_precision
from kidney_edge.runtime.report_page import ReportOptions, check_report_format, write_run_report
from kidney_edge.runtime.rows import (
    OutputFormat,
    PredictSummary,
    format_predictions,
    label_counts,
    output_columns,
)
from kidney_edge.runtime.series import (
    HeaderLookup,
    RunSeries,
    SeriesMode,
    SeriesOptions,
    assess_run_series,
    read_prediction_rows,
    series_path,
    write_run_series,
)
from kidney_edge.runtime.triage import RowEvidence, TriageCollector

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]
Progress = Callable[[int, int], None]  # (files done, files to do)
SummaryT = TypeVar("SummaryT", bound=PredictSummary)


class RowSink(Protocol):
    """What an engine calls per batch of rows; ``evidence``: the model inputs and activation maps
    of the same ONNX call (an engine that has them, when asked; the triage page keeps a few)."""

    def __call__(self, rows: Rows, evidence: RowEvidence | None = None, /) -> None: ...


class PredictEngine(Protocol):
    """Where a predict run's rows are computed: the one step that differs between engines."""

    def classify(self, paths: list[str], write: RowSink) -> None:
        """Give each of ``paths`` exactly one row of :func:`~kidney_edge.runtime.rows.output_columns`
        through ``write``, a batch of rows at a time, in any order. A file that cannot be read
        gets an error row (:func:`~kidney_edge.runtime.rows.error_row`), never an exception."""


class RowWriter(Protocol):
    """Where rows go: a predictions file (or folder) opened for this run."""

    done: set[str]  # paths already written before this run (--resume), read when it was opened

    def write(self, rows: Rows) -> None: ...

    def close(self) -> None: ...


WriterFactory = Callable[[Path, OutputFormat, list[str], bool], RowWriter]  # (out, fmt, columns, resume)


# Images per onnxruntime call unless --batch-size says: 8 at 224 px or less, and as many pixels
# per call above (2 at 448 px). onnxruntime's intermediate tensors grow with a call's pixels: the
# 448 px pair model peaked at 544.7 MB in predict at batch 8 and at 243.1 MB at batch 2, where it
# also ran faster (INT8 183.9 against 172.4 images/s; benchmarks/results/runtime.md, AMD EPYC
# AVX-512 VNNI section and its notes).
DEFAULT_BATCH_SIZE = 8
_DEFAULT_BATCH_PIXELS = DEFAULT_BATCH_SIZE * 224 * 224  # eight views of 224 px


def default_batch_size(input_size: int) -> int:
    """Images per onnxruntime call for a model of ``input_size`` px when the user does not say."""
    return max(1, min(DEFAULT_BATCH_SIZE, _DEFAULT_BATCH_PIXELS // (input_size * input_size)))


@dataclass(frozen=True)
class PredictJob:
    """What every engine's run shares: the model to load, the output and how to write it."""

    out: Path
    fmt: OutputFormat
    batch_size: int | None  # None: default_batch_size of the model's input
    resume: bool
    model: Path | None  # an export folder, an .onnx file, or None: the newest export folder
    precision: Precision
    threads: int  # onnxruntime threads of each session (per worker's share, per actor)
    ood: bool
    probe: Probe | None = None  # replaces --precision auto's speed probe (tests, benchmarks)
    report: ReportOptions | None = None  # --report: the triage page, written when the run ends
    series: SeriesOptions | None = None  # series rows beside out when the run ends; None: no series
    headers: HeaderLookup | None = None  # the rows' DICOM headers when not read from files (DICOMweb)

    @property
    def assesses_series(self) -> bool:
        return self.series is not None and self.series.mode is not SeriesMode.OFF


# --------------------------------------------------------------------------- the streaming writer


def _drop_partial_last_line(out: Path) -> None:
    """A kill -9 can leave half a row at the end: cut the file back to its last newline."""
    size = out.stat().st_size
    if size == 0:
        return
    with open(out, "rb+") as handle:
        tail_start = max(0, size - (1 << 20))
        handle.seek(tail_start)
        tail = handle.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        keep = tail_start + cut + 1 if cut >= 0 else 0  # rows are far shorter than 1 MiB
        log.warning("%s: dropping a partially written last line (%d bytes)", out, size - keep)
        handle.truncate(keep)


def done_paths(out: Path, fmt: OutputFormat, columns: list[str]) -> set[str]:
    """Paths that already have a row in ``out`` (predicted or failed), after repairing its end."""
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    _drop_partial_last_line(out)
    with open(out, encoding="utf-8", newline="") as handle:
        if fmt is OutputFormat.JSONL:
            return _done_paths_jsonl(out, handle, columns)
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return set()
        if header != columns:
            raise InputError(
                f"--resume: {out} has columns {header}, but this model writes {columns}; "
                "pass another --out or drop --resume to start over"
            )
        return {row[0] for row in reader if row}


def _done_paths_jsonl(out: Path, handle: Any, columns: list[str]) -> set[str]:
    done = set()
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"--resume: {out} line {number} is not JSON; pass another --out") from None
        if sorted(row) != sorted(columns):
            raise InputError(
                f"--resume: {out} line {number} has keys {sorted(row)}, but this model writes "
                f"{columns}; pass another --out or drop --resume to start over"
            )
        done.add(row["path"])
    return done


class TextWriter:
    """CSV/JSONL rows appended to one file, flushed per batch: a crash or Ctrl-C keeps every
    finished row. With ``resume`` it appends after the rows already there (``done``)."""

    def __init__(self, out: Path, fmt: OutputFormat, columns: list[str], resume: bool) -> None:
        self.done = done_paths(out, fmt, columns) if resume else set()
        append = resume and out.is_file() and out.stat().st_size > 0
        out.parent.mkdir(parents=True, exist_ok=True)
        self._fmt, self._columns = fmt, columns
        # Streamed, not atomic: the point is that rows already written survive an interruption.
        self._handle = open(out, "a" if append else "w", encoding="utf-8", newline="")
        if not append and fmt is OutputFormat.CSV:
            self._handle.write(format_predictions([], columns, header=True))

    def write(self, rows: Rows) -> None:
        self._handle.write(format_predictions(rows, self._columns, self._fmt))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


# --------------------------------------------------------------------------- the run


def _load_while_listing(
    job: PredictJob, list_files: Callable[[], list[str]]
) -> tuple[PrecisionChoice, OnnxClassifier, list[str]]:
    """The model under ``job.precision`` and the files to classify.

    Loading and optimising the graph takes a few hundred ms and mostly runs outside the GIL:
    the files are listed meanwhile, as part of the start-up to the first batch. A bad model is
    reported before a listing error, as it would be if the two ran one after the other.
    """
    load = partial(OnnxClassifier, threads=job.threads, ood=job.ood)
    with ThreadPoolExecutor(1, thread_name_prefix="kidney-edge-load") as loader:
        pending = loader.submit(
            resolve_precision, job.model, job.precision, batch_size=job.batch_size, threads=job.threads,
            probe=job.probe, load=load,
        )  # fmt: skip
        try:
            files = list_files()
        except KidneyEdgeError:
            pending.result()
            raise
        choice, classifier = pending.result()
    return choice, classifier, files


def _new_summary(
    new_summary: Callable[..., SummaryT],
    job: PredictJob,
    choice: PrecisionChoice,
    classifier: OnnxClassifier,
    **counts: int,
) -> SummaryT:
    """The summary before the first row: the model, its precision choice and zero label counts."""
    spec = classifier.spec
    return new_summary(
        out=job.out,
        model=classifier.path,
        fmt=job.fmt.value,
        decision_rule=spec.decision_rule.describe(),
        class_names=spec.class_names,
        is_int8=classifier.is_int8,
        ood_detector=None if classifier.ood is None else classifier.ood.describe(),
        precision=choice.precision.value,
        precision_reason=choice.reason,
        precision_warning=choice.warning,
        positive_class=spec.positive_class,
        spec_schema_version=spec.schema_version,
        toolkit_version=spec.toolkit_version,
        threads=classifier.threads,
        batch_size=job.batch_size or default_batch_size(spec.input_size),
        class_counts=label_counts(spec.class_names, ood=classifier.ood is not None),
        **counts,
    )


def _row_sink(
    writer: RowWriter,
    summary: PredictSummary,
    todo: int,
    started: float,
    progress: Progress | None,
    collector: TriageCollector | None,
) -> RowSink:
    """What an engine calls per batch of rows: write them, count them, keep the triage page's
    pictures (``collector``, --report), report progress."""

    def write(rows: Rows, evidence: RowEvidence | None = None, /) -> None:
        writer.write(rows)
        if collector is not None:
            collector.add(rows, evidence)
        summary.record(rows)
        if summary.first_batch_s is None:
            summary.first_batch_s = time.perf_counter() - started
        if progress is not None:
            progress(summary.processed, todo)

    return write


def run_predict(
    job: PredictJob,
    *,
    list_files: Callable[[], list[str]],
    start: Callable[[OnnxClassifier, SummaryT], PredictEngine],
    new_summary: Callable[..., SummaryT],
    open_writer: WriterFactory = TextWriter,
    progress: Progress | None = None,
) -> SummaryT:
    """One predict run: every file ``list_files`` names gets one row in ``job.out``.

    ``start(classifier, summary)`` builds the engine once the model is loaded, batching
    ``summary.batch_size`` images per call (it may record its own facts in ``summary``, an
    instance of ``new_summary``, which takes the engine's own fields bound). ``open_writer``
    opens ``job.out`` (default: CSV/JSONL text). ``progress(done, total)`` is called before the
    first batch and after each. Ctrl-C ends the run early with ``summary.interrupted`` set
    instead of raising; every finished row is kept.
    """
    started = time.perf_counter()
    if job.report is not None:
        check_report_format(job.fmt)
    choice, classifier, files = _load_while_listing(job, list_files)
    collector = (
        None
        if job.report is None
        else TriageCollector(
            classifier.spec, job.report.max_per_group, job.headers, series=job.assesses_series
        )
    )
    columns = output_columns(classifier.class_names)
    with contextlib.closing(open_writer(job.out, job.fmt, columns, job.resume)) as writer:
        todo = [path for path in files if path not in writer.done]
        summary = _new_summary(
            new_summary, job, choice, classifier, total_files=len(files), skipped=len(files) - len(todo)
        )
        log.info("%d images listed, %d already in %s", len(files), len(writer.done), job.out)
        # A listing may hold millions of paths: from here on only those still to do are kept.
        del files
        writer.done = set()
        write = _row_sink(writer, summary, len(todo), started, progress, collector)
        try:
            if progress is not None:
                progress(0, len(todo))
            if todo:
                start(classifier, summary).classify(todo, write)
        except KeyboardInterrupt:
            summary.interrupted = True
            log.info("interrupted: %d rows written to %s", summary.processed, job.out)
    summary.wall_s = time.perf_counter() - started
    if not summary.interrupted:  # series rows and the page need every row: a --resume run writes them
        _after_rows(job, classifier, summary, collector)
    return summary


def _after_rows(
    job: PredictJob, classifier: OnnxClassifier, summary: PredictSummary, collector: TriageCollector | None
) -> None:
    """The series rows (``job.series``) and the triage page (``job.report``) of a finished run,
    from one read of ``job.out`` (old rows too, with --resume): each series is assessed once, and
    the page shows the series the rows were written for."""
    if not job.assesses_series and job.report is None:
        return
    spec = classifier.spec
    rows = read_prediction_rows(job.out, job.fmt.value)
    series: RunSeries | None = None
    if job.series is not None and job.assesses_series:
        series = assess_run_series(rows, spec.class_names, spec.positive_class, job.series.rule, job.headers)
        summary.series = write_run_series(
            series, job.series, series_path(job.out), class_names=spec.class_names, fmt=job.fmt.value
        )
    if job.report is not None and collector is not None:
        page = write_run_report(job.report, job.out, rows, spec, summary, collector, series)
        summary.report = page.path
