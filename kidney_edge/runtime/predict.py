"""``kidney-edge predict``: classify a folder of images into a streamed predictions file.

The predictions schema lives here once: :func:`output_columns` names the columns of predict's
CSV/JSONL rows (and, ``labelled``, of evaluate's predictions.csv), :func:`prediction_rows`
fills them from probabilities under the spec's decision rule, :func:`format_predictions`
writes them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import ImageReadError, InputError, enum_choice
from kidney_edge.imaging import SUPPORTED_SUFFIXES, ImageSource, is_image_file, preprocess
from kidney_edge.io_utils import csv_text
from kidney_edge.runtime.classifier import OnnxClassifier
from kidney_edge.runtime.hardware import available_cpus
from kidney_edge.runtime.precision import Precision, PrecisionChoice, Probe, resolve_precision
from kidney_edge.spec import UNKNOWN_LABEL, ModelSpec

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NOTHING_READ = 2  # same code as bad arguments: nothing useful came out of the run
EXIT_SOME_FAILED = 3  # predictions were written, but some files have an `error` row instead
_MAX_LISTED_FAILURES = 20


class OutputFormat(str, Enum):
    """Format of a predictions file (``--format``)."""

    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"  # a folder of Parquet parts: written by `--engine ray` only


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``kidney-edge predict``; validated here so every caller gets the same messages."""

    folder: Path
    model: Path | None = None
    out: Path = Path("predictions.csv")
    fmt: OutputFormat = OutputFormat.CSV
    batch_size: int = 8
    threads: int | None = None
    workers: int | None = None
    resume: bool = False
    precision: Precision = Precision.AUTO
    ood: bool = True  # label inputs the model's OOD detector rejects as unknown (--no-ood: off)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "folder", Path(self.folder))
        set_(self, "out", Path(self.out))
        if self.model is not None:
            set_(self, "model", Path(self.model))
        set_(self, "fmt", enum_choice(OutputFormat, self.fmt, "--format"))
        if self.fmt is OutputFormat.PARQUET:
            raise InputError("--format parquet needs --engine ray; local predict writes csv or jsonl")
        set_(self, "precision", enum_choice(Precision, self.precision, "--precision"))
        if not self.folder.is_dir():
            raise InputError(
                f"FOLDER {self.folder} is not a directory; pass the folder of images to classify"
            )
        if not 1 <= self.batch_size <= 512:
            raise InputError(f"--batch-size must be in 1..512, got {self.batch_size}")
        execution_layout(self.threads, self.workers)  # checks --threads and --workers
        if self.out.is_dir():
            raise InputError(f"--out {self.out} is a directory; pass a file name such as predictions.csv")


@dataclass
class PredictSummary:
    """What a predict run did. ``exit_code`` is what the CLI exits with."""

    out: Path
    model: Path
    fmt: str
    decision_rule: str
    class_names: tuple[str, ...]
    is_int8: bool
    ood_detector: str | None  # the detector in words; None without one (or with --no-ood)
    threads: int
    workers: int
    batch_size: int
    total_files: int = 0  # images found in the folder
    skipped: int = 0  # already in the output (--resume)
    predicted: int = 0
    failed: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)  # the first few (path, error)
    wall_s: float = 0.0
    first_batch_s: float | None = None  # from the call to the first batch on disk
    interrupted: bool = False
    precision: str = ""  # fp32 or int8: the model that ran (runtime.precision)
    precision_reason: str = ""  # why that one: forced, gate record, measured speed on this CPU
    precision_warning: str | None = None  # a forced INT8 without a passed accuracy gate
    positive_class: str | None = None  # the spec's positive class (series rows name its peak slice)

    @property
    def processed(self) -> int:
        return self.predicted + self.failed

    @property
    def images_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.failed == 0:
            return EXIT_OK
        return EXIT_NOTHING_READ if self.predicted == 0 else EXIT_SOME_FAILED


def _log_unreadable_folder(error: OSError) -> None:
    log.warning("skipping an unreadable folder: %s", error)


def scan_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``folder``, recursively, in a deterministic (sorted, depth-first) order."""
    return [Path(path) for path in scan_image_paths(folder)]


def scan_image_paths(folder: str | os.PathLike[str]) -> list[str]:
    """:func:`scan_images` as absolute path strings: the row keys every engine writes."""
    # Plain strings, not Path objects: on 100,000 files Path construction alone costs seconds
    # of start-up before the first batch.
    root = os.path.abspath(folder)  # absolute without resolving symlinks: stable row keys
    found: list[str] = []
    for directory, subdirs, files in os.walk(root, onerror=_log_unreadable_folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            suffix = os.path.splitext(name)[1].lower()
            if suffix[1:].isdigit():  # a UID-style DICOM name (1.2.840.113619.2.55.3): no suffix
                suffix = ""
            if name.startswith(".") or (suffix and suffix not in SUPPORTED_SUFFIXES):
                continue  # is_image_file would say no; skip building a Path for it
            path = os.path.join(directory, name)
            if suffix or is_image_file(path):  # no suffix: is_image_file looks for DICOM magic
                found.append(path)
    return found


FLOAT_DIGITS = 6  # decimals of probabilities and confidence in a predictions CSV


def output_columns(class_names: Sequence[str], *, labelled: bool = False) -> list[str]:
    """The predictions schema: ``path``, ``label``, ``argmax_label``, ``confidence``,
    ``p_<Class>`` per class, ``ood_score``, ``error``.

    ``labelled`` (evaluate's predictions.csv): ``true_label`` after ``path`` and no ``error``,
    since every evaluated file was read or the evaluation stopped naming it.
    """
    scores = ["label", "argmax_label", "confidence", *(f"p_{name}" for name in class_names), "ood_score"]
    return ["path", "true_label", *scores] if labelled else ["path", *scores, "error"]


def prediction_rows(
    paths: Sequence[Any],
    probabilities: np.ndarray,
    spec: ModelSpec,
    *,
    true_labels: Sequence[str] | None = None,
    ood_scores: np.ndarray | None = None,
    unknown: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One row per file of :func:`output_columns`: ``label`` under the spec's decision rule, or
    :data:`~kidney_edge.spec.UNKNOWN_LABEL` where ``unknown`` (the OOD detector rejected it);
    ``argmax_label`` the most probable class; ``confidence`` the label's probability (empty for
    unknown); ``ood_score`` the detector's score (empty without a detector).

    With ``true_labels`` the rows are ``labelled``: they carry ``true_label`` and no ``error``.
    """
    n = len(paths)
    labels, argmax = spec.decide(probabilities), probabilities.argmax(axis=1)
    truths = [None] * n if true_labels is None else true_labels
    scores = [None] * n if ood_scores is None else [float(score) for score in ood_scores]
    rejected = np.zeros(n, dtype=bool) if unknown is None else np.asarray(unknown, dtype=bool)
    rows = []
    for i, (path, truth, label, top, probs) in enumerate(
        zip(paths, truths, labels, argmax, probabilities, strict=True)
    ):
        row: dict[str, Any] = {"path": path}
        if true_labels is not None:
            row["true_label"] = truth
        row.update(
            label=UNKNOWN_LABEL if rejected[i] else spec.class_names[label],
            argmax_label=spec.class_names[top],
            confidence=None if rejected[i] else float(probs[label]),
        )
        row.update({f"p_{name}": float(p) for name, p in zip(spec.class_names, probs, strict=True)})
        row["ood_score"] = scores[i]
        if true_labels is None:
            row["error"] = None
        rows.append(row)
    return rows


def format_predictions(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    fmt: OutputFormat = OutputFormat.CSV,
    *,
    header: bool = False,
) -> str:
    """Rows as CSV lines (``header`` first when asked; floats with :data:`FLOAT_DIGITS` decimals,
    None as an empty cell) or as JSON lines."""
    if fmt is OutputFormat.JSONL:
        return "".join(json.dumps(row) + "\n" for row in rows)
    return csv_text(rows, columns, header=header, float_digits=FLOAT_DIGITS)


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


@dataclass
class _LoadedBatch:
    sources: list[ImageSource]  # what was asked for: paths (predict, Ray) or decoded images (serve)
    inputs: np.ndarray  # (k, 3, S, S) float32: only the files that could be read (rows of `buffer`)
    ok: list[int]  # index into `sources` of each row of `inputs`
    errors: dict[int, str]  # index into `sources` -> why that file could not be read
    buffer: np.ndarray  # the (>= len(sources), 3, S, S) float32 array `inputs` is a view of


def _load_batch(
    sources: list[ImageSource], spec: ModelSpec, buffer: np.ndarray | None = None
) -> _LoadedBatch:
    """Decode + preprocess one batch into ``buffer`` (a new array when None), each file straight
    into its row: no per-image array and no copy into the batch. Pillow's decoder and numpy's
    arithmetic release the GIL, so workers decode side by side."""
    size = spec.input_size
    if buffer is None:
        buffer = np.empty((len(sources), 3, size, size), dtype=np.float32)
    assert buffer.shape[0] >= len(sources) and buffer.shape[1:] == (3, size, size), buffer.shape
    ok: list[int] = []
    errors: dict[int, str] = {}
    for index, source in enumerate(sources):
        try:
            preprocess(source, spec, out=buffer[len(ok)])  # a failed file's row is overwritten by the next
            ok.append(index)
        except ImageReadError as exc:
            errors[index] = exc.reason
        except Exception as exc:  # one odd file must never stop a 100,000-file run
            errors[index] = f"unexpected {type(exc).__name__}: {exc}"
    return _LoadedBatch(sources, buffer[: len(ok)], ok, errors, buffer)


@dataclass(frozen=True)
class Classified:
    """Rows of :func:`output_columns` for a batch, in order, and what the graph gave beside them."""

    rows: list[dict[str, Any]]
    cams: dict[int, np.ndarray]  # row index -> (C, h, w) class activation maps, when asked and read


def _classify_loaded(loaded: _LoadedBatch, classifier: OnnxClassifier, *, cam: bool = False) -> Classified:
    """One output row per source of the batch, in order; failed sources carry `error`."""
    spec = classifier.spec
    columns = output_columns(spec.class_names)
    predicted, cams = {}, {}
    if loaded.ok:
        outputs = classifier.infer(loaded.inputs, cam=cam and classifier.has_cam)  # one ONNX call
        ok_sources = [loaded.sources[index] for index in loaded.ok]
        rows = prediction_rows(
            ok_sources, outputs.probabilities, spec, ood_scores=outputs.ood_scores, unknown=outputs.unknown
        )
        predicted = dict(zip(loaded.ok, rows, strict=True))
        if outputs.cam is not None:
            cams = dict(zip(loaded.ok, outputs.cam, strict=True))
    rows = []
    for index, source in enumerate(loaded.sources):
        row = predicted.get(index) or {**dict.fromkeys(columns), "path": source}
        row["error"] = loaded.errors.get(index)
        rows.append(row)
    return Classified(rows, cams)


def classify(sources: Sequence[ImageSource], classifier: OnnxClassifier, *, cam: bool = False) -> Classified:
    """Decode, preprocess, infer, decide: the one chain every entry point runs (folder predict,
    serve, a Ray actor). ``sources`` are paths, file bytes or decoded images (each row's ``path``
    is its source). Unreadable sources get a row with ``error`` set and empty scores instead of
    raising. ``cam``: also the class activation maps, from the same ONNX call, when the graph has them.
    """
    return _classify_loaded(_load_batch(list(sources), classifier.spec), classifier, cam=cam)


def classify_paths(paths: Sequence[str], classifier: OnnxClassifier) -> list[dict[str, Any]]:
    """:func:`classify`'s rows for file paths."""
    return classify(paths, classifier).rows


def record_rows(summary: PredictSummary, rows: list[dict[str, Any]]) -> None:
    """Count written rows into ``summary``: predicted per label, failed, the first failures."""
    for row in rows:
        if row["error"] is None:
            summary.predicted += 1
            summary.class_counts[row["label"]] += 1
        else:
            summary.failed += 1
            if len(summary.failures) < _MAX_LISTED_FAILURES:
                summary.failures.append((row["path"], row["error"]))


# Workers by default at most: each batch in flight holds a batch buffer and onnxruntime's
# activations (tens of MB at batch 8, 224 px), so more would cost memory for little throughput
# on an edge box. --workers may ask for up to WORKERS_LIMIT.
MAX_WORKERS = 8
WORKERS_LIMIT = 64


@dataclass(frozen=True)
class ExecutionLayout:
    """How predict spends the CPUs: ``workers`` batches in flight, each decoded and run through
    the one shared onnxruntime session by its own thread, with ``threads`` intra-op threads."""

    workers: int
    threads: int


def execution_layout(threads: int | None = None, workers: int | None = None) -> ExecutionLayout:
    """The layout for ``--threads``/``--workers`` (either may be None: derived from the usable
    CPUs); InputError for values out of range.

    Default: one worker per usable CPU (up to :data:`MAX_WORKERS`), each with one onnxruntime
    thread. Whole batches side by side use the cores better than one batch split across them:
    no barrier waits inside each operator, and decoding fills the gaps of the other worker's
    inference. On 2 cores, predict end to end ran 1.2x (INT8) and 1.4x (fp32) faster with 2
    single-thread workers than with one 2-thread worker (``benchmarks/results/runtime.md``,
    layouts).
    """
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    if workers is not None and not 1 <= workers <= WORKERS_LIMIT:
        raise InputError(f"--workers must be in 1..{WORKERS_LIMIT}, got {workers}")
    cpus = available_cpus()
    if workers is None:
        workers = min(MAX_WORKERS, max(1, cpus // threads)) if threads else min(MAX_WORKERS, cpus)
    if threads is None:
        threads = max(1, cpus // workers)
    return ExecutionLayout(workers=workers, threads=threads)


def _infer_batch(
    paths: list[str], classifier: OnnxClassifier, buffer: np.ndarray
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """One worker's job: decode ``paths`` into ``buffer``, infer, decide -> (rows, ``buffer``)."""
    return _classify_loaded(_load_batch(paths, classifier.spec, buffer), classifier).rows, buffer


def _run_batches(
    todo: list[str],
    classifier: OnnxClassifier,
    config: PredictConfig,
    write: Callable[[list[dict[str, Any]]], None],
    summary: PredictSummary,
) -> None:
    """Batches decoded and inferred by ``summary.workers`` threads side by side, written in order.

    At most ``workers + 1`` batches are in flight, each in one of ``workers + 2`` preallocated
    buffers that cycle: memory stays flat however many files there are, and no batch-sized
    array is allocated (and page-faulted in) per batch. onnxruntime's ``run`` is thread-safe
    and releases the GIL, as do Pillow's decoder and numpy's arithmetic.
    """
    window = summary.workers + 1
    size, spec = config.batch_size, classifier.spec
    free = [np.empty((size, 3, spec.input_size, spec.input_size), np.float32) for _ in range(window + 1)]

    def write_next() -> None:
        rows, buffer = pending.popleft().result()
        write(rows)
        free.append(buffer)

    with ThreadPoolExecutor(summary.workers, thread_name_prefix="kidney-edge-predict") as pool:
        pending: deque[Future[tuple[list[dict[str, Any]], np.ndarray]]] = deque()
        try:
            for start in range(0, len(todo), size):
                pending.append(pool.submit(_infer_batch, todo[start : start + size], classifier, free.pop()))
                if len(pending) > window:
                    write_next()
            while pending:
                write_next()
        finally:
            for future in pending:  # Ctrl-C or an error: do not start what will not be written
                future.cancel()


def predict_folder(
    folder: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = PredictConfig.out,
    fmt: OutputFormat | str = PredictConfig.fmt,
    batch_size: int = PredictConfig.batch_size,
    threads: int | None = None,
    workers: int | None = None,
    resume: bool = False,
    precision: Precision | str = PredictConfig.precision,
    probe: Probe | None = None,
    ood: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> PredictSummary:
    """Classify every image under ``folder`` and stream one row per file to ``out``.

    Columns: ``path`` (absolute), ``label`` (the spec's decision rule), ``argmax_label`` (the
    most probable class), ``confidence`` (the label's probability), ``p_<Class>``
    (temperature-calibrated, summing to 1), ``ood_score`` and ``error``. With the model's OOD
    detector on (``ood``, the default) an input it rejects gets label ``unknown``; its
    probabilities are still written.

    Rows are flushed per batch, so an interrupted run keeps every finished row; ``resume``
    skips files already in ``out`` and appends. Unreadable files get a row with ``error``.
    ``progress(done, total)`` is called after each batch. Ctrl-C ends the run early with
    ``summary.interrupted`` set instead of raising.

    ``model`` is an export folder, an .onnx file or None (the newest export folder); ``precision``
    picks fp32 or INT8 from a folder (:mod:`~kidney_edge.runtime.precision`; ``probe`` replaces
    its speed probe).
    """
    started = time.perf_counter()
    config = PredictConfig(
        folder=Path(folder),
        model=None if model is None else Path(model),
        out=Path(out),
        fmt=fmt,
        batch_size=batch_size,
        threads=threads,
        workers=workers,
        resume=resume,
        precision=precision,
        ood=ood,
    )
    layout = execution_layout(config.threads, config.workers)
    # Loading and optimising the graph takes a few hundred ms and mostly runs outside the GIL:
    # scan the folder meanwhile, it is part of the start-up to the first batch.
    with ThreadPoolExecutor(1, thread_name_prefix="kidney-edge-load") as loader:
        pending_classifier = loader.submit(
            resolve_precision, config.model, config.precision, batch_size=config.batch_size,
            threads=layout.threads, probe=probe, load=partial(OnnxClassifier, threads=layout.threads, ood=config.ood),
        )  # fmt: skip
        files = scan_image_paths(config.folder)
        choice, classifier = pending_classifier.result()
    if not files:
        raise InputError(
            f"no images found under {config.folder} (suffixes {', '.join(sorted(SUPPORTED_SUFFIXES))}, "
            "or DICOM files without a suffix)"
        )
    columns = output_columns(classifier.class_names)
    done = done_paths(config.out, config.fmt, columns) if config.resume else set()
    todo = [path for path in files if path not in done]
    summary = _new_summary(
        config,
        classifier,
        choice,
        workers=layout.workers,
        total_files=len(files),
        skipped=len(files) - len(todo),
    )
    log.info("%d images under %s, %d already in %s", len(files), config.folder, len(done), config.out)

    def write(rows: list[dict[str, Any]]) -> None:
        handle.write(format_predictions(rows, columns, config.fmt))
        handle.flush()  # per batch: a crash or Ctrl-C keeps every finished row
        record_rows(summary, rows)
        if summary.first_batch_s is None:
            summary.first_batch_s = time.perf_counter() - started
        if progress is not None:
            progress(summary.processed, len(todo))

    append = config.resume and config.out.is_file() and config.out.stat().st_size > 0
    config.out.parent.mkdir(parents=True, exist_ok=True)
    # Streamed, not atomic: the point is that rows already written survive an interruption.
    with open(config.out, "a" if append else "w", encoding="utf-8", newline="") as handle:
        if not append and config.fmt is OutputFormat.CSV:
            handle.write(format_predictions([], columns, header=True))
        if progress is not None:
            progress(0, len(todo))
        try:
            _run_batches(todo, classifier, config, write, summary)
        except KeyboardInterrupt:
            summary.interrupted = True
            log.info("interrupted: %d rows written to %s", summary.processed, config.out)
    summary.wall_s = time.perf_counter() - started
    return summary


def model_facts(classifier: OnnxClassifier, choice: PrecisionChoice) -> dict[str, Any]:
    """The :class:`PredictSummary` fields that describe the model and its precision choice,
    whatever engine ran it."""
    spec = classifier.spec
    return {
        "decision_rule": spec.decision_rule.describe(),
        "class_names": spec.class_names,
        "is_int8": classifier.is_int8,
        "ood_detector": None if classifier.ood is None else classifier.ood.describe(),
        "precision": choice.precision.value,
        "precision_reason": choice.reason,
        "precision_warning": choice.warning,
        "positive_class": spec.positive_class,
    }


def _new_summary(
    config: PredictConfig,
    classifier: OnnxClassifier,
    choice: PrecisionChoice,
    *,
    workers: int,
    total_files: int,
    skipped: int,
) -> PredictSummary:
    spec = classifier.spec
    return PredictSummary(
        out=config.out,
        model=classifier.path,
        fmt=config.fmt.value,
        **model_facts(classifier, choice),
        threads=classifier.threads,
        workers=workers,
        batch_size=config.batch_size,
        total_files=total_files,
        skipped=skipped,
        class_counts=dict.fromkeys(
            (*spec.class_names, *([UNKNOWN_LABEL] if classifier.ood is not None else [])), 0
        ),
    )
