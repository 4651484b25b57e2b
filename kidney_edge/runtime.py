"""The edge runtime: an ONNX classifier on onnxruntime, no PyTorch anywhere on this path.

:class:`OnnxClassifier` reads the model spec from the ONNX file's own metadata, so a ``.onnx``
file alone is enough to preprocess, predict and decide. :func:`available_cpus` sizes the
thread pool from the CPUs this process may actually use (affinity and cgroup quota), not from
the host's core count, which over-subscribes containers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import ImageReadError, InputError, KidneyEdgeError
from kidney_edge.imaging import SUPPORTED_SUFFIXES
from kidney_edge.spec import ONNX_METADATA_KEY, ModelSpec

log = logging.getLogger(__name__)

_CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_cpu_limit() -> float | None:
    """CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when unlimited/unknown."""
    try:
        if _CGROUP_V2_CPU_MAX.exists():
            quota, period = _CGROUP_V2_CPU_MAX.read_text().split()[:2]
            if quota == "max":
                return None
            return int(quota) / int(period)
        if _CGROUP_V1_QUOTA.exists() and _CGROUP_V1_PERIOD.exists():
            quota_us = int(_CGROUP_V1_QUOTA.read_text())
            period_us = int(_CGROUP_V1_PERIOD.read_text())
            return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError) as exc:
        log.debug("cannot read the cgroup CPU quota: %s", exc)
    return None


def available_cpus() -> int:
    """CPUs this process may use: min(affinity mask, cgroup quota rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def _session_options(threads: int | None):  # -> onnxruntime.SessionOptions
    import onnxruntime as ort

    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cpus()
    # One image batch is one graph: parallelism lives inside the operators, so inter-op
    # threads would only compete with intra-op ones for the same cores.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads sleep instead of spin-waiting: a spinning thread steals its core from
    # the decode thread (and from anything else on a small edge box). Measured on the 2-core
    # dev machine under load ~3, Lite0 at batch 8: +20-25% images/s, model-only and end to end.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    return options


class OnnxClassifier:
    """An exported kidney-edge ONNX model on the CPU execution provider.

    The file must carry its :class:`ModelSpec` in ``metadata_props`` under
    :data:`~kidney_edge.spec.ONNX_METADATA_KEY` (``kidney-edge export`` writes it).
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"model file not found: {self.path} (pass --model FILE.onnx)")
        self.threads = threads or available_cpus()
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=_session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped exceptions for bad files
            raise InputError(
                f"{self.path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]}); "
                "pass a model.onnx written by `kidney-edge export`"
            ) from None
        self.spec = self._read_spec()
        self._input_name = self._session.get_inputs()[0].name
        self._output_names = [o.name for o in self._session.get_outputs()]
        self.is_int8 = self._detect_int8()

    def _read_spec(self) -> ModelSpec:
        metadata = self._session.get_modelmeta().custom_metadata_map
        if ONNX_METADATA_KEY not in metadata:
            raise InputError(
                f"{self.path} has no kidney-edge spec in its metadata (key {ONNX_METADATA_KEY!r}); "
                "export the model with `kidney-edge export` so preprocessing travels with it"
            )
        try:
            return ModelSpec.from_json(metadata[ONNX_METADATA_KEY])
        except InputError as exc:
            raise InputError(f"{self.path}: invalid spec in ONNX metadata: {exc}") from None

    def _detect_int8(self) -> bool:
        # Cheap and torch/onnx-free: the export names INT8 files model.int8.onnx, and quantized
        # graphs contain QuantizeLinear nodes whose names survive in the raw protobuf bytes.
        if ".int8" in self.path.name:
            return True
        with open(self.path, "rb") as handle:
            head = handle.read(4 << 20)
        return b"QuantizeLinear" in head or b"QLinearConv" in head

    @property
    def input_size(self) -> int:
        return int(self.spec.input_size)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, S, S) float32 -> ((N, C) logits, (N, C) probabilities with temperature applied)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        size = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise InputError(f"{self.path}: expected input (N, 3, {size}, {size}), got {batch.shape}")
        try:
            values = self._session.run(None, {self._input_name: batch})
            outputs = dict(zip(self._output_names, values, strict=True))
        except Exception as exc:
            raise KidneyEdgeError(f"onnxruntime failed on {self.path}: {exc}") from None
        logits = np.asarray(outputs.get("logits", next(iter(outputs.values()))), dtype=np.float32)
        if "probabilities" in outputs:
            probabilities = np.asarray(outputs["probabilities"], dtype=np.float32)
        else:  # a logits-only graph: calibrate here from the spec, as the export would have
            probabilities = self.spec.probabilities(logits)
        return logits, probabilities

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, C) calibrated probabilities."""
        return self.run(batch)[1]

    def __repr__(self) -> str:
        kind = "int8" if self.is_int8 else "fp32"
        return f"OnnxClassifier({str(self.path)!r}, {kind}, threads={self.threads})"


# --------------------------------------------------------------------------- default model


def find_default_model(export_root: str | os.PathLike[str] = "export") -> Path:
    """The newest ``EXPORT_ROOT/*/model.onnx`` (by modification time)."""
    root = Path(export_root)
    candidates = sorted(root.glob("*/model.onnx"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not candidates:
        raise InputError(
            f"no model found: {root}/*/model.onnx does not exist. Run `kidney-edge demo` to build a small "
            "model, or `kidney-edge export RUN_DIR` for a trained run, or pass --model FILE.onnx"
        )
    return candidates[-1]


# --------------------------------------------------------------------------- predict a folder

EXIT_OK = 0
EXIT_NOTHING_READ = 2  # same code as bad arguments: nothing useful came out of the run
EXIT_SOME_FAILED = 3  # predictions were written, but some files have an `error` row instead
_MAX_LISTED_FAILURES = 20


class OutputFormat(str, Enum):
    CSV = "csv"
    JSONL = "jsonl"


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

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "folder", Path(self.folder))
        set_(self, "out", Path(self.out))
        if self.model is not None:
            set_(self, "model", Path(self.model))
        try:
            set_(self, "fmt", OutputFormat(self.fmt))
        except ValueError:
            raise InputError(f"--format must be 'csv' or 'jsonl', got {self.fmt!r}") from None
        if not self.folder.is_dir():
            raise InputError(
                f"FOLDER {self.folder} is not a directory; pass the folder of images to classify"
            )
        if not 1 <= self.batch_size <= 512:
            raise InputError(f"--batch-size must be in 1..512, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}")
        if self.workers is not None and not 1 <= self.workers <= 64:
            raise InputError(f"--workers must be in 1..64, got {self.workers}")
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
    return [Path(path) for path in _scan_image_paths(folder)]


def _scan_image_paths(folder: str | os.PathLike[str]) -> list[str]:
    # Plain strings, not Path objects: on 100,000 files Path construction alone costs seconds
    # of start-up before the first batch.
    from kidney_edge.imaging import is_image_file

    root = os.path.abspath(folder)  # absolute without resolving symlinks: stable row keys
    found: list[str] = []
    for directory, subdirs, files in os.walk(root, onerror=_log_unreadable_folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            suffix = os.path.splitext(name)[1].lower()
            if name.startswith(".") or (suffix and suffix not in SUPPORTED_SUFFIXES):
                continue  # is_image_file would say no; skip building a Path for it
            path = os.path.join(directory, name)
            if suffix or is_image_file(path):  # no suffix: is_image_file looks for DICOM magic
                found.append(path)
    return found


def output_columns(class_names: tuple[str, ...]) -> list[str]:
    """The predictions schema every writer shares (predict here, evaluate with ``true_label``)."""
    return ["path", "label", "argmax_label", "confidence", *(f"p_{name}" for name in class_names), "error"]


def prediction_rows(
    paths: Sequence[Any], probabilities: np.ndarray, spec: ModelSpec
) -> list[dict[str, Any]]:
    """One row per file of :func:`output_columns`: ``label`` under the spec's decision rule,
    ``argmax_label`` the most probable class, ``confidence`` the label's probability."""
    labels, argmax = spec.decide(probabilities), probabilities.argmax(axis=1)
    rows = []
    for path, label, top, probs in zip(paths, labels, argmax, probabilities, strict=True):
        row: dict[str, Any] = {
            "path": path,
            "label": spec.class_names[label],
            "argmax_label": spec.class_names[top],
            "confidence": float(probs[label]),
        }
        row.update({f"p_{name}": float(p) for name, p in zip(spec.class_names, probs, strict=True)})
        row["error"] = None
        rows.append(row)
    return rows


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV lines (no header) of ``rows``: floats with 6 decimals, None as an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    for row in rows:
        writer.writerow(
            {k: ("" if v is None else f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()}
        )
    return buffer.getvalue()


def _format_rows(rows: list[dict[str, Any]], fmt: OutputFormat, columns: list[str]) -> str:
    if fmt is OutputFormat.JSONL:
        return "".join(json.dumps(row) + "\n" for row in rows)
    return csv_text(rows, columns)


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


def _done_paths(out: Path, fmt: OutputFormat, columns: list[str]) -> set[str]:
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
    paths: list[str]
    inputs: np.ndarray  # (k, 3, S, S) float32: only the files that could be read
    ok: list[int]  # index into `paths` of each row of `inputs`
    errors: dict[int, str]  # index into `paths` -> why that file could not be read


def _load_batch(paths: list[str], spec: ModelSpec) -> _LoadedBatch:
    """Decode + preprocess one batch (runs in a worker thread; Pillow releases the GIL)."""
    from kidney_edge.imaging import preprocess

    size = spec.input_size
    inputs = np.empty((len(paths), 3, size, size), dtype=np.float32)
    ok: list[int] = []
    errors: dict[int, str] = {}
    for index, path in enumerate(paths):
        try:
            inputs[len(ok)] = preprocess(path, spec)
            ok.append(index)
        except ImageReadError as exc:
            errors[index] = exc.reason
        except Exception as exc:  # one odd file must never stop a 100,000-file run
            errors[index] = f"unexpected {type(exc).__name__}: {exc}"
    return _LoadedBatch(paths, inputs[: len(ok)], ok, errors)


def _batch_rows(loaded: _LoadedBatch, classifier: OnnxClassifier) -> list[dict[str, Any]]:
    """One output row per file of the batch, in file order; failed files carry `error`."""
    spec = classifier.spec
    columns = output_columns(spec.class_names)
    predicted = {}
    if loaded.ok:
        probabilities = classifier.predict(loaded.inputs)  # (len(ok), C)
        ok_paths = [loaded.paths[index] for index in loaded.ok]
        predicted = dict(zip(loaded.ok, prediction_rows(ok_paths, probabilities, spec), strict=True))
    rows = []
    for index, path in enumerate(loaded.paths):
        row = predicted.get(index) or {**dict.fromkeys(columns), "path": path}
        row["error"] = loaded.errors.get(index)
        rows.append(row)
    return rows


def _record(summary: PredictSummary, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if row["error"] is None:
            summary.predicted += 1
            summary.class_counts[row["label"]] += 1
        else:
            summary.failed += 1
            if len(summary.failures) < _MAX_LISTED_FAILURES:
                summary.failures.append((row["path"], row["error"]))


def _default_workers() -> int:
    # Decoding a draft-mode JPEG costs a fraction of the model's time per image, so one or two
    # decode threads keep the model fed; more would only steal cores from onnxruntime.
    return max(1, min(2, available_cpus() // 2))


def _run_batches(
    todo: list[str],
    classifier: OnnxClassifier,
    config: PredictConfig,
    write: Callable[[list[dict[str, Any]]], None],
    summary: PredictSummary,
) -> None:
    """Decode in a thread pool, at most `workers + 1` batches ahead; infer and write in order."""
    window = summary.workers + 1  # bounded: memory stays flat however many files there are
    size = config.batch_size
    with ThreadPoolExecutor(summary.workers, thread_name_prefix="kidney-edge-decode") as pool:
        pending: deque[Future[_LoadedBatch]] = deque()
        try:
            for start in range(0, len(todo), size):
                pending.append(pool.submit(_load_batch, todo[start : start + size], classifier.spec))
                if len(pending) > window:
                    write(_batch_rows(pending.popleft().result(), classifier))
            while pending:
                write(_batch_rows(pending.popleft().result(), classifier))
        finally:
            for future in pending:  # Ctrl-C or an error: do not decode what will not be written
                future.cancel()


def predict_folder(
    folder: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = Path("predictions.csv"),
    fmt: str = "csv",
    batch_size: int = 8,
    threads: int | None = None,
    workers: int | None = None,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PredictSummary:
    """Classify every image under ``folder`` and stream one row per file to ``out``.

    Columns: ``path`` (absolute), ``label`` (the spec's decision rule), ``argmax_label`` (the
    most probable class), ``confidence`` (the label's probability), ``p_<Class>``
    (temperature-calibrated, summing to 1) and ``error``.

    Rows are flushed per batch, so an interrupted run keeps every finished row; ``resume``
    skips files already in ``out`` and appends. Unreadable files get a row with ``error``.
    ``progress(done, total)`` is called after each batch. Ctrl-C ends the run early with
    ``summary.interrupted`` set instead of raising.
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
    )
    model_path = config.model or find_default_model()
    # Loading and optimising the graph takes a few hundred ms and mostly runs outside the GIL:
    # scan the folder meanwhile, it is part of the start-up to the first batch.
    with ThreadPoolExecutor(1, thread_name_prefix="kidney-edge-load") as loader:
        pending_classifier = loader.submit(OnnxClassifier, model_path, threads=config.threads)
        files = _scan_image_paths(config.folder)
        classifier = pending_classifier.result()
    if not files:
        raise InputError(
            f"no images found under {config.folder} (suffixes {', '.join(sorted(SUPPORTED_SUFFIXES))}, "
            "or DICOM files without a suffix)"
        )
    columns = output_columns(classifier.class_names)
    done = _done_paths(config.out, config.fmt, columns) if config.resume else set()
    todo = [path for path in files if path not in done]
    summary = _new_summary(config, classifier, total_files=len(files), skipped=len(files) - len(todo))
    log.info("%d images under %s, %d already in %s", len(files), config.folder, len(done), config.out)

    def write(rows: list[dict[str, Any]]) -> None:
        handle.write(_format_rows(rows, config.fmt, columns))
        handle.flush()  # per batch: a crash or Ctrl-C keeps every finished row
        _record(summary, rows)
        if summary.first_batch_s is None:
            summary.first_batch_s = time.perf_counter() - started
        if progress is not None:
            progress(summary.processed, len(todo))

    append = config.resume and config.out.is_file() and config.out.stat().st_size > 0
    config.out.parent.mkdir(parents=True, exist_ok=True)
    # Streamed, not atomic: the point is that rows already written survive an interruption.
    with open(config.out, "a" if append else "w", encoding="utf-8", newline="") as handle:
        if not append and config.fmt is OutputFormat.CSV:
            handle.write(",".join(columns) + "\n")
        if progress is not None:
            progress(0, len(todo))
        try:
            _run_batches(todo, classifier, config, write, summary)
        except KeyboardInterrupt:
            summary.interrupted = True
            log.info("interrupted: %d rows written to %s", summary.processed, config.out)
    summary.wall_s = time.perf_counter() - started
    return summary


def _new_summary(
    config: PredictConfig, classifier: OnnxClassifier, *, total_files: int, skipped: int
) -> PredictSummary:
    spec = classifier.spec
    return PredictSummary(
        out=config.out,
        model=classifier.path,
        fmt=config.fmt.value,
        decision_rule=spec.decision_rule.describe(),
        class_names=spec.class_names,
        is_int8=classifier.is_int8,
        threads=classifier.threads,
        workers=config.workers or _default_workers(),
        batch_size=config.batch_size,
        total_files=total_files,
        skipped=skipped,
        class_counts=dict.fromkeys(spec.class_names, 0),
    )
