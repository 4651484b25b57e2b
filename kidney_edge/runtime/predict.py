"""``kidney-edge predict``: classify a folder of images into a streamed predictions file.

Here live the one chain every entry point runs on a batch (:func:`classify`: decode,
preprocess, infer, decide), the folder scan, and the local engine (:class:`LocalEngine`:
worker threads sharing one onnxruntime session). :func:`predict_folder` hands that engine to
the driver (:func:`~kidney_edge.runtime.driver.run_predict`), which owns the rest of a run;
the predictions schema is :mod:`~kidney_edge.runtime.rows`.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import ImageReadError, InputError, enum_choice
from kidney_edge.imaging import SUPPORTED_SUFFIXES, ImageSource, is_image_file, preprocess, view_spec
from kidney_edge.runtime.classifier import OnnxClassifier
from kidney_edge.runtime.driver import PredictJob, RowSink, run_predict
from kidney_edge.runtime.hardware import available_cpus
from kidney_edge.runtime.precision import Precision, Probe
from kidney_edge.runtime.report_page import ReportOptions
from kidney_edge.runtime.rows import (
    DEFAULT_PREDICTIONS_FILE,
    OutputFormat,
    PredictSummary,
    error_row,
    prediction_rows,
)
from kidney_edge.runtime.series import HeaderLookup, SeriesOptions
from kidney_edge.spec import ModelSpec

log = logging.getLogger(__name__)

Reader = Callable[[str], ImageSource]  # a row key -> the bytes or file to decode for it


@dataclass(frozen=True, kw_only=True)
class PredictOptions:
    """What every predict entry point shares, whatever its source (a folder, a DICOMweb server,
    Ray): the model, the output, the batching and the extras of a run. Validated here, once,
    with messages naming the CLI flag, so every caller gets the same ones. An entry point takes
    its source plus one of these, and checks only what its engine adds (the local engine has no
    ``--format parquet``; Ray has no ``--workers``)."""

    model: Path | None = None  # an export folder, an .onnx file, or None: the newest export folder
    out: Path = Path(DEFAULT_PREDICTIONS_FILE)
    fmt: OutputFormat = OutputFormat.CSV
    batch_size: int | None = None  # None: the model's own (driver.default_batch_size of its input)
    threads: int | None = None  # None: derived from the usable CPUs (Ray: DEFAULT_ACTOR_THREADS)
    workers: int | None = None  # None: one per usable CPU, up to MAX_WORKERS (local engine only)
    resume: bool = False
    precision: Precision = Precision.AUTO
    ood: bool = True  # label inputs the model's OOD detector rejects as unknown (--no-ood: off)
    series: SeriesOptions | None = None  # series rows beside out when the run ends; None: none
    report: ReportOptions | None = None  # --report: the triage page, written when the run ends
    probe: Probe | None = None  # replaces --precision auto's speed probe (tests, benchmarks)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "out", Path(self.out))
        if self.model is not None:
            set_(self, "model", Path(self.model))
        set_(self, "fmt", enum_choice(OutputFormat, self.fmt, "--format"))
        set_(self, "precision", enum_choice(Precision, self.precision, "--precision"))
        if self.batch_size is not None and not 1 <= self.batch_size <= 512:
            raise InputError(f"--batch-size must be in 1..512, got {self.batch_size}")
        execution_layout(self.threads, self.workers)  # checks --threads and --workers
        if self.fmt is not OutputFormat.PARQUET and self.out.is_dir():  # parquet: Ray checks its folder
            raise InputError(
                f"--out {self.out} is a directory; pass a file name such as {DEFAULT_PREDICTIONS_FILE}"
            )

    def local_layout(self) -> ExecutionLayout:
        """The local engine's workers and threads; InputError for ``--format parquet`` (Ray's alone)."""
        if self.fmt is OutputFormat.PARQUET:
            raise InputError("--format parquet needs --engine ray; local predict writes csv or jsonl")
        return execution_layout(self.threads, self.workers)

    def job(self, threads: int, headers: HeaderLookup | None = None) -> PredictJob:
        """The driver's job for these options, with each session's onnxruntime ``threads``."""
        return PredictJob(
            out=self.out, fmt=self.fmt, batch_size=self.batch_size, resume=self.resume, model=self.model,
            precision=self.precision, threads=threads, ood=self.ood, probe=self.probe, report=self.report,
            series=self.series, headers=headers,
        )  # fmt: skip


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


@dataclass
class _LoadedBatch:
    sources: list[ImageSource]  # what was asked for: paths (predict, Ray) or decoded images (serve)
    inputs: np.ndarray  # (k, 3, S, S) float32: only the files that could be read (rows of `buffer`)
    ok: list[int]  # index into `sources` of each row of `inputs`
    errors: dict[int, str]  # index into `sources` -> why that file could not be read
    buffer: np.ndarray  # the (>= len(sources), 3, S, S) float32 array `inputs` is a view of


def _load_batch(
    sources: list[ImageSource], spec: ModelSpec, buffer: np.ndarray | None = None, read: Reader | None = None
) -> _LoadedBatch:
    """Decode + preprocess one batch into ``buffer`` (a new array when None), each file straight
    into its row: no per-image array and no copy into the batch. Pillow's decoder and numpy's
    arithmetic release the GIL, so workers decode side by side. ``read`` turns each source (a
    row key) into what is decoded, e.g. an instance's bytes fetched from a DICOMweb server; it
    raises ImageReadError for a source it cannot fetch."""
    size = spec.input_size
    if buffer is None:
        buffer = np.empty((len(sources), 3, size, size), dtype=np.float32)
    assert buffer.shape[0] >= len(sources) and buffer.shape[1:] == (3, size, size), buffer.shape
    ok: list[int] = []
    errors: dict[int, str] = {}
    for index, source in enumerate(sources):
        try:
            data = source if read is None else read(source)
            preprocess(data, spec, out=buffer[len(ok)])  # a failed file's row is overwritten by the next
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
    # row index -> (3, S, S) float32 model input, when ``cam`` was asked: a view of the batch
    # buffer, valid until the buffer is reused (predict --report keeps a thumbnail of a few)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)


def _classify_loaded(loaded: _LoadedBatch, classifier: OnnxClassifier, *, cam: bool = False) -> Classified:
    """One output row per source of the batch, in order; failed sources carry `error`."""
    spec = classifier.spec
    predicted, cams, inputs = {}, {}, {}
    if loaded.ok:
        outputs = classifier.infer(loaded.inputs, cam=cam and classifier.has_cam)  # one ONNX call
        ok_sources = [loaded.sources[index] for index in loaded.ok]
        rows = prediction_rows(
            ok_sources, outputs.probabilities, spec, ood_scores=outputs.ood_scores, unknown=outputs.unknown
        )
        predicted = dict(zip(loaded.ok, rows, strict=True))
        if outputs.cam is not None:
            cams = dict(zip(loaded.ok, outputs.cam, strict=True))
        if cam:
            inputs = dict(zip(loaded.ok, loaded.inputs, strict=True))
    rows = [
        predicted.get(index) or error_row(source, loaded.errors[index], spec.class_names)
        for index, source in enumerate(loaded.sources)
    ]
    return Classified(rows, cams, inputs)


def classify(
    sources: Sequence[ImageSource], classifier: OnnxClassifier, *, cam: bool = False, views: bool = False
) -> Classified:
    """Decode, preprocess, infer, decide: the one chain every entry point runs (folder predict,
    serve, a Ray actor). ``sources`` are paths, file bytes or decoded images (each row's ``path``
    is its source). Unreadable sources get a row with ``error`` set and empty scores instead of
    raising. ``cam``: also the class activation maps, from the same ONNX call, when the graph has them.
    ``views``: the sources are the model's views already (:func:`~kidney_edge.imaging.resized_image`
    of a decoded image), so they are only normalised.
    """
    spec = view_spec(classifier.spec) if views else classifier.spec
    return _classify_loaded(_load_batch(list(sources), spec), classifier, cam=cam)


def classify_paths(paths: Sequence[str], classifier: OnnxClassifier) -> list[dict[str, Any]]:
    """:func:`classify`'s rows for file paths."""
    return classify(paths, classifier).rows


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
    paths: list[str], classifier: OnnxClassifier, buffer: np.ndarray, cam: bool, read: Reader | None = None
) -> tuple[Classified, np.ndarray]:
    """One worker's job: decode ``paths`` into ``buffer``, infer, decide -> (rows and maps, ``buffer``)."""
    return _classify_loaded(_load_batch(paths, classifier.spec, buffer, read), classifier, cam=cam), buffer


@dataclass(frozen=True)
class LocalEngine:
    """The local :class:`~kidney_edge.runtime.driver.PredictEngine`: ``workers`` threads, each
    decoding and inferring whole batches through the one shared onnxruntime session."""

    classifier: OnnxClassifier
    batch_size: int
    workers: int
    evidence: bool = False  # hand the sink each batch's inputs and activation maps (--report)
    read: Reader | None = None  # row key -> what to decode (default: the key is a file path)

    def classify(self, paths: list[str], write: RowSink) -> None:
        """Batches decoded and inferred side by side, written in order.

        At most ``workers + 1`` batches are in flight, each in one of ``workers + 2``
        preallocated buffers that cycle: memory stays flat however many files there are, and no
        batch-sized array is allocated (and page-faulted in) per batch. onnxruntime's ``run`` is
        thread-safe and releases the GIL, as do Pillow's decoder and numpy's arithmetic.
        """
        window, size, spec = self.workers + 1, self.batch_size, self.classifier.spec
        free = [np.empty((size, 3, spec.input_size, spec.input_size), np.float32) for _ in range(window + 1)]

        def write_next() -> None:
            classified, buffer = pending.popleft().result()
            write(classified.rows, classified if self.evidence else None)  # before the buffer is reused
            free.append(buffer)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="kidney-edge-predict") as pool:
            pending: deque[Future[tuple[Classified, np.ndarray]]] = deque()
            try:
                for start in range(0, len(paths), size):
                    batch = paths[start : start + size]
                    pending.append(
                        pool.submit(
                            _infer_batch, batch, self.classifier, free.pop(), self.evidence, self.read
                        )
                    )
                    if len(pending) > window:
                        write_next()
                while pending:
                    write_next()
            finally:
                for future in pending:  # Ctrl-C or an error: do not start what will not be written
                    future.cancel()


def _images_under(folder: Path) -> list[str]:
    """:func:`scan_image_paths`, or an InputError when the folder holds no image."""
    files = scan_image_paths(folder)
    if not files:
        raise InputError(
            f"no images found under {folder} (suffixes {', '.join(sorted(SUPPORTED_SUFFIXES))}, "
            "or DICOM files without a suffix)"
        )
    return files


def predict_folder(
    folder: str | os.PathLike[str],
    options: PredictOptions | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> PredictSummary:
    """Classify every image under ``folder`` and stream one row per file to ``options.out``.

    Columns: ``path`` (absolute), ``label`` (the spec's decision rule), ``argmax_label`` (the
    most probable class), ``confidence`` (the label's probability), ``p_<Class>``
    (temperature-calibrated, summing to 1), ``ood_score`` and ``error``. With the model's OOD
    detector on (``options.ood``, the default) an input it rejects gets label ``unknown``; its
    probabilities are still written.

    Rows are flushed per batch, so an interrupted run keeps every finished row; ``resume``
    skips files already in ``out`` and appends. Unreadable files get a row with ``error``.
    ``progress(done, total)`` is called after each batch. Ctrl-C ends the run early with
    ``summary.interrupted`` set instead of raising.

    ``options.model`` is an export folder, an .onnx file or None (the newest export folder);
    ``precision`` picks fp32 or INT8 from a folder (:mod:`~kidney_edge.runtime.precision`;
    ``probe`` replaces its speed probe). ``series``: also the series rows of the DICOM files
    when the run ends (:mod:`~kidney_edge.runtime.series`; None: none). ``report``: also the
    triage page of every row at the end (:mod:`~kidney_edge.runtime.report_page`), its pictures
    from the same ONNX calls as the rows, its series strips those of ``series``.
    """
    options = options or PredictOptions()
    layout = options.local_layout()
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"FOLDER {folder} is not a directory; pass the folder of images to classify")
    return run_predict(
        options.job(layout.threads),
        list_files=partial(_images_under, folder),
        start=lambda classifier, summary: LocalEngine(
            classifier, summary.batch_size, layout.workers, evidence=options.report is not None
        ),
        new_summary=partial(PredictSummary, workers=layout.workers),
        progress=progress,
    )
