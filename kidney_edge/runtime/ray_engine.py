"""``kidney-edge predict --engine ray``: local predict's rows, computed by a pool of Ray Data actors.

The run is predict's own (:func:`~kidney_edge.runtime.driver.run_predict`, in this process):
it lists SOURCE (a local or shared folder with predict's own scan; an object-store URI such as
``s3://bucket/slices`` with ``pyarrow.fs``), drops the paths already in ``--out``
(``--resume``) and streams the rows to CSV/JSONL as they arrive, or to a folder of Parquet
parts (``--format parquet``). :class:`RayEngine` computes the rows: it puts (index, path)
blocks into a Ray Dataset and maps them through a fixed pool of :class:`RayClassifier` actors.
Each actor loads one :class:`OnnxClassifier` in ``__init__`` (an onnxruntime session cannot be
pickled) and runs every batch through :func:`~kidney_edge.runtime.predict.classify_paths`, the
chain local predict runs, so the rows are the same: same preprocessing, spec, decision rule and
OOD detector.

A file that kills its worker process (a decoder crash, an out-of-memory kill): Ray restarts
the actor and retries the task :data:`WORKER_DEATH_RETRIES` times; a block that still fails is
dropped by Ray Data, its paths have no row at the end of the pass, and a second pass runs each
of them alone. A file that fails alone too gets an error row (:data:`WORKER_DIED`); the rest of
its block gets its predictions. No file is lost.

Memory: the driver holds each listed path once (a list of str) plus Ray Data's bookkeeping of
the input blocks, about 220 bytes a path in all (benchmarks/results/ray.md), and the rows of one
output block at a time; the blocks themselves live in Ray's object store. ``ray`` and
``pyarrow`` are imported inside the functions that need them: the base install never imports
them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import InputError, KidneyEdgeError, enum_choice
from kidney_edge.imaging import SUPPORTED_SUFFIXES
from kidney_edge.io_utils import atomic_path, atomic_write_bytes
from kidney_edge.runtime.classifier import OnnxClassifier
from kidney_edge.runtime.driver import RowSink, RowWriter, TextWriter, run_predict
from kidney_edge.runtime.predict import PredictOptions, classify_paths, scan_image_paths
from kidney_edge.runtime.rows import (
    DEFAULT_PREDICTIONS_FILE,
    OutputFormat,
    PredictSummary,
    error_row,
    is_number_column,
    output_columns,
)
from kidney_edge.runtime.series import SeriesMode

log = logging.getLogger(__name__)

RAY_INSTALL_HINT = 'pip install "kidney-edge[ray]"'
# One onnxruntime thread per actor and one actor per CPU: an actor decodes a batch, then infers
# it, so single-thread actors keep every core busy without intra-op synchronisation
# (benchmarks/results/ray.md compares 2 actors x 1 thread with 1 actor x 2 threads).
DEFAULT_ACTOR_THREADS = 1
# Input blocks: one block is one actor task, and the most files a second pass reruns one by
# one after a worker death. At least BLOCKS_PER_ACTOR per actor keep the pool balanced to the
# end; at most MAX_BLOCK_ROWS rows. Ray Data's from_arrow costs the driver ~50 KB of heap per
# block besides the paths (measured: 200,000 paths in 128-row blocks +77 MB, in 2048-row
# blocks +11 MB; benchmarks/results/ray.md), so large listings get large blocks.
BLOCKS_PER_ACTOR = 4
MAX_BLOCK_ROWS = 2048
# Actors hand rows back in blocks of about this size (about a hundred rows) instead of one
# block per task: the driver writes, and the progress bar moves, every dozen batches or so.
OUTPUT_BLOCK_BYTES = 16 << 10
# Retries of a task whose actor died, before Ray Data drops its block (Ray restarts the actor).
WORKER_DEATH_RETRIES = 1
WORKER_DIED = (
    "the Ray worker died or raised on this file alone, after retries (a decoder crash or an "
    "out-of-memory kill); the worker's log in the Ray session folder has the cause"
)
PARQUET_PART_ROWS = 100_000  # rows per Parquet part file (a few MB); each is written atomically
_PARQUET_PART, _PARQUET_PARTS = "part-{:05d}.parquet", "part-*.parquet"
_INDEX = "__kidney_edge_index"  # position of a path in the driver's list; not an output column


class Engine(str, Enum):
    """``predict --engine``: where the rows are computed."""

    LOCAL = "local"  # this process: worker threads sharing one onnxruntime session
    RAY = "ray"  # a pool of Ray Data actors, on this machine or an existing cluster


def import_ray() -> Any:
    """``ray`` with Ray Data loaded, or an InputError that says what to install."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise InputError(
            f"--engine ray needs Ray Data ({exc.name} is not installed): {RAY_INSTALL_HINT}"
        ) from None
    return ray


def check_engine_options(
    engine: Engine | str,
    *,
    actors: int | None,
    address: str | None,
    workers: int | None,
    fmt: OutputFormat | str,
) -> Engine:
    """``engine`` as an :class:`Engine`, or an InputError for an option the other engine owns."""
    engine = enum_choice(Engine, engine, "--engine")
    fmt = enum_choice(OutputFormat, fmt, "--format")
    if engine is Engine.LOCAL:
        given = [flag for flag, value in (("--actors", actors), ("--address", address)) if value is not None]
        if fmt is OutputFormat.PARQUET:
            given.append("--format parquet")
        if given:
            raise InputError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --engine ray")
    elif workers is not None:
        raise InputError(
            "--workers sets local decode threads; with --engine ray each actor decodes its own batches"
        )
    return engine


def series_readable(source: str | os.PathLike[str], fmt: OutputFormat | str) -> bool:
    """Whether series rows can follow a predict run: they read the predictions file and each
    DICOM header back from disk, so not a Parquet folder, nor files in object storage."""
    return enum_choice(OutputFormat, fmt, "--format") is not OutputFormat.PARQUET and not is_uri(source)


def is_uri(source: str | os.PathLike[str]) -> bool:
    """Whether SOURCE names object storage or a remote filesystem (``s3://...``, ``gs://...``)."""
    return "://" in str(source)


@dataclass(frozen=True)
class RayPredictConfig:
    """``kidney-edge predict --engine ray``: SOURCE, the actor pool, and the options every entry
    point shares; what Ray adds is validated here for every caller."""

    source: str
    options: PredictOptions = field(default_factory=PredictOptions)
    actors: int | None = None  # default: the cluster's CPUs // threads
    address: str | None = None  # None: start Ray on this machine; "auto" or "ray://host:10001"

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", str(self.source))
        if not is_uri(self.source) and not Path(self.source).is_dir():
            raise InputError(
                f"SOURCE {self.source} is not a directory; pass a folder of images (shared by every "
                "node on a cluster) or an object-store URI such as s3://bucket/slices"
            )
        if self.options.workers is not None:
            raise InputError(
                "--workers sets local decode threads; with --engine ray each actor decodes its own batches"
            )
        if self.actors is not None and not 1 <= self.actors <= 10_000:
            raise InputError(f"--actors must be in 1..10000, got {self.actors}")
        if self.options.fmt is OutputFormat.PARQUET:
            _check_parquet_out(self.options.out)

    @property
    def threads(self) -> int:
        """onnxruntime threads per actor, and the CPUs each reserves."""
        return self.options.threads or DEFAULT_ACTOR_THREADS


def _check_parquet_out(out: Path) -> None:
    """--format parquet writes a folder: refuse a file, or a name that says csv/jsonl."""
    if out.is_file() or out.suffix.lower() in (".csv", ".jsonl"):
        raise InputError(
            f"--format parquet writes a folder of part files; pass --out "
            f"{Path(DEFAULT_PREDICTIONS_FILE).with_suffix('.parquet')}, not {out}"
        )


@dataclass
class RayPredictSummary(PredictSummary):
    """A predict run on Ray: :class:`PredictSummary` plus the pool and the files lost to it."""

    actors: int = 0
    address: str = "local"
    fatal_files: int = 0  # files that failed alone after retries (error rows :data:`WORKER_DIED`)
    second_pass: int = 0  # files rerun one by one because their block was dropped


# --------------------------------------------------------------------------- listing


def list_source(source: str) -> list[str]:
    """Image paths under SOURCE in a deterministic order: predict's own scan for a folder;
    for a URI every object whose suffix is an image suffix, outside hidden folders, as URIs.

    Objects without a suffix are not sniffed for DICOM magic under a URI (that would read
    every object at listing time); give DICOM objects a ``.dcm`` suffix.
    """
    if not is_uri(source):
        return scan_image_paths(source)
    import pyarrow
    import pyarrow.fs as pafs

    scheme = source.split("://", 1)[0]
    try:
        filesystem, root = pafs.FileSystem.from_uri(source)
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, pyarrow.ArrowException) as exc:
        raise InputError(f"SOURCE {source} cannot be listed ({type(exc).__name__}: {exc})") from None
    found = []
    for info in infos:
        relative = info.path[len(root) :].lstrip("/")
        if info.type != pafs.FileType.File or any(part.startswith(".") for part in relative.split("/")):
            continue
        if os.path.splitext(info.path)[1].lower() in SUPPORTED_SUFFIXES:
            found.append(f"{scheme}://{info.path}")
    return sorted(found)


# --------------------------------------------------------------------------- the actor


def _stage_model(model_bytes: bytes) -> Path:
    """The model's bytes as a file on this node, named by content: one copy per node and model."""
    digest = hashlib.sha256(model_bytes).hexdigest()[:24]
    path = Path(tempfile.gettempdir()) / "kidney-edge-models" / f"{digest}.onnx"
    if not path.is_file() or path.stat().st_size != len(model_bytes):
        atomic_write_bytes(path, model_bytes)
    return path


class RayClassifier:
    """The callable class of ``map_batches``: one OnnxClassifier per actor, built once.

    The model comes as bytes (the driver's file need not exist on a worker node) and is staged
    to a content-named file. A batch is an Arrow table of (index, path); the result has the
    predictions ``schema`` plus the index, one row per path.
    """

    def __init__(
        self, model_bytes: bytes, *, threads: int, ood: bool, schema: Any, source: str | None
    ) -> None:
        self.classifier = OnnxClassifier(_stage_model(model_bytes), threads=threads, ood=ood)
        self.schema = schema
        self.columns = schema.names
        self._remote = None
        if source is not None and is_uri(source):
            import pyarrow.fs as pafs

            self._remote = pafs.FileSystem.from_uri(source)[0]
            self._scheme = source.split("://", 1)[0] + "://"
            self._scratch = tempfile.mkdtemp(prefix="kidney-edge-ray-")

    def __call__(self, batch: Any) -> Any:  # pyarrow.Table -> pyarrow.Table
        import pyarrow as pa

        paths = batch.column("path").to_pylist()
        rows = (
            self._classify_remote(paths)
            if self._remote is not None
            else classify_paths(paths, self.classifier)
        )
        table = pa.Table.from_pylist(
            [{name: row[name] for name in self.columns} for row in rows], schema=self.schema
        )
        return table.append_column(_INDEX, batch.column(_INDEX))

    def _classify_remote(self, uris: list[str]) -> list[dict[str, Any]]:
        """Copy each object to this actor's scratch folder, then run the one chain on the copies."""
        local: list[str] = []
        fetch_errors: dict[int, str] = {}
        for position, uri in enumerate(uris):
            copy = os.path.join(self._scratch, f"{position}{os.path.splitext(uri)[1]}")
            try:
                with (
                    self._remote.open_input_stream(uri.removeprefix(self._scheme)) as stream,
                    open(copy, "wb") as out,
                ):
                    shutil.copyfileobj(stream, out)
            except Exception as exc:  # any storage error is this file's error row, not the run's end
                fetch_errors[position] = f"could not read from storage ({type(exc).__name__}: {exc})"
            local.append(copy)
        try:
            rows = classify_paths(local, self.classifier)
        finally:
            for copy in local:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(copy)
        for position, (row, uri) in enumerate(zip(rows, uris, strict=True)):
            row["path"] = uri
            if position in fetch_errors:
                row["error"] = fetch_errors[position]
        return rows


# --------------------------------------------------------------------------- writers


def arrow_schema(columns: list[str]) -> Any:  # -> pyarrow.Schema
    """Arrow types of the predictions columns (numbers float64, the rest strings), so every block
    and Parquet part has one schema even when it holds only failures."""
    import pyarrow as pa

    return pa.schema([(name, pa.float64() if is_number_column(name) else pa.string()) for name in columns])


class _ParquetWriter:
    """A folder of Parquet parts, each written atomically once it holds :data:`PARQUET_PART_ROWS`
    rows (and at the end): an interruption loses at most the part being filled."""

    def __init__(self, folder: Path, schema: Any, resume: bool) -> None:
        import pyarrow.parquet as pq

        self._folder, self._schema, self._pending = folder, schema, []
        parts = sorted(folder.glob(_PARQUET_PARTS)) if folder.is_dir() else []
        self.done: set[str] = set()
        if resume:
            for part in parts:
                names = pq.read_schema(part).names
                if names != schema.names:
                    raise InputError(
                        f"--resume: {part} has columns {names}, but this model writes {schema.names}; "
                        "pass another --out or drop --resume to start over"
                    )
                self.done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        else:
            for part in parts:  # a fresh run replaces the predictions, as CSV's "w" does
                part.unlink()
        self._next = len(parts) if resume else 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._pending.extend(rows)
        if len(self._pending) >= PARQUET_PART_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        table = pa.Table.from_pylist(self._pending, schema=self._schema)
        with atomic_path(self._folder / _PARQUET_PART.format(self._next)) as tmp:
            pq.write_table(table, tmp)
        self._next += 1
        self._pending = []

    def close(self) -> None:
        self._flush()


def open_writer(out: Path, fmt: OutputFormat, columns: list[str], resume: bool) -> RowWriter:
    """The driver's writer for ``fmt``: a folder of Parquet parts, or predict's CSV/JSONL file."""
    if fmt is OutputFormat.PARQUET:
        return _ParquetWriter(out, arrow_schema(columns), resume)
    return TextWriter(out, fmt, columns, resume)


# --------------------------------------------------------------------------- the engine


@contextlib.contextmanager
def _ray_session(ray: Any, address: str | None) -> Iterator[None]:
    """Ray for this run: the process's own if it has one, else a new local one or a connection
    to ``address``; shut down at the end only if started here."""
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {"address": address, "logging_level": logging.WARNING}
    if address is None:
        # A local Ray on an edge box must not phone home: usage statistics off unless the user
        # asked for them (RAY_USAGE_STATS_ENABLED=1).
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        options["include_dashboard"] = False
    try:
        ray.init(**options)
    except ConnectionError as exc:
        raise InputError(f"--address {address}: no Ray cluster reachable ({exc})") from None
    try:
        yield
    finally:
        ray.shutdown()


def _blocks(todo: Sequence[str], indices: Sequence[int], rows: int) -> list[Any]:
    """(index, path) Arrow tables of ``rows`` rows: Ray Data's input blocks."""
    import pyarrow as pa

    return [
        pa.table(
            {_INDEX: pa.array(chunk, pa.int64()), "path": pa.array([todo[i] for i in chunk], pa.string())}
        )
        for chunk in (indices[start : start + rows] for start in range(0, len(indices), rows))
    ]


def _block_rows(files: int, actors: int, batch_size: int) -> int:
    """Rows per input block: whole batches, BLOCKS_PER_ACTOR blocks per actor, at most MAX_BLOCK_ROWS."""
    per_block = -(-files // (actors * BLOCKS_PER_ACTOR))
    batches = -(-per_block // batch_size)
    return max(batch_size, min(batches * batch_size, MAX_BLOCK_ROWS // batch_size * batch_size))


def _dataset(
    ray: Any,
    blocks: list[Any],
    actor_args: dict[str, Any],
    *,
    actors: int,
    threads: int,
    batch_size: int,
    tasks_per_actor: int | None = None,
) -> Any:
    from ray.data import ActorPoolStrategy

    with warnings.catch_warnings():
        # Ray 2.60 deprecates **ray_remote_args, but the actor's retry counts have no named
        # parameter yet (the extra pins ray below 2.64, which removes them).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = ray.data.from_arrow(blocks).map_batches(
            RayClassifier,
            fn_constructor_kwargs=actor_args,
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=tasks_per_actor),
            num_cpus=threads,
            max_restarts=-1,  # a dead actor is replaced, however often
            max_task_retries=WORKER_DEATH_RETRIES,
        )
    dataset.context.max_errored_blocks = -1  # a dropped block is found and rerun by the driver
    dataset.context.target_max_block_size = OUTPUT_BLOCK_BYTES
    dataset.context.enable_progress_bars = False  # the CLI draws its own
    return dataset


def _classify_on_ray(
    ray: Any,
    todo: list[str],
    actor_args: dict[str, Any],
    config: RayPredictConfig,
    write: RowSink,
    summary: RayPredictSummary,
) -> None:
    """Every path of ``todo`` gets exactly one row through ``write``, in completion order."""
    written = np.zeros(len(todo), dtype=bool)

    def consume(dataset: Any) -> None:
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            written[table.column(_INDEX).to_numpy()] = True
            write(table.drop_columns([_INDEX]).to_pylist())

    actors = summary.actors
    block_rows = _block_rows(len(todo), actors, summary.batch_size)
    common = {"actor_args": actor_args, "threads": config.threads}
    consume(
        _dataset(ray, _blocks(todo, range(len(todo)), block_rows), **common, actors=actors,
                 batch_size=summary.batch_size)
    )  # fmt: skip
    missing = np.flatnonzero(~written)
    if missing.size == 0:
        return
    if missing.size == len(todo) and len(todo) > block_rows:
        raise KidneyEdgeError(
            f"every Ray task failed ({len(todo)} files, none classified); the worker logs in the "
            "Ray session folder (/tmp/ray/session_latest/logs) have the cause"
        )
    log.warning("%d files lost with their worker; running each of them alone", missing.size)
    summary.second_pass = int(missing.size)
    # One task at a time per actor: a file that kills its actor takes no queued file with it.
    consume(
        _dataset(ray, _blocks(todo, missing.tolist(), 1), **common, actors=min(actors, int(missing.size)),
                 batch_size=1, tasks_per_actor=1)
    )  # fmt: skip
    lost = np.flatnonzero(~written)
    summary.fatal_files = int(lost.size)
    for index in lost.tolist():
        write([error_row(todo[index], WORKER_DIED, summary.class_names)])


@dataclass(frozen=True)
class RayEngine:
    """The Ray :class:`~kidney_edge.runtime.driver.PredictEngine`: a pool of :class:`RayClassifier`
    actors in this process's Ray, a new local one, or the cluster at ``config.address``. It
    records its pool and the files lost to it in ``summary``."""

    ray: Any
    config: RayPredictConfig
    classifier: OnnxClassifier  # the driver's copy: its file is sent to the actors as bytes
    summary: RayPredictSummary

    def classify(self, paths: list[str], write: RowSink) -> None:
        config, summary = self.config, self.summary
        with _ray_session(self.ray, config.address):
            cpus = int(self.ray.cluster_resources().get("CPU", 1))
            summary.actors = config.actors or max(1, cpus // config.threads)
            actor_args = {
                "model_bytes": self.classifier.path.read_bytes(), "threads": config.threads, "ood": config.options.ood,
                "schema": arrow_schema(output_columns(self.classifier.class_names)), "source": config.source,
            }  # fmt: skip
            _classify_on_ray(self.ray, paths, actor_args, config, write, summary)


def _images_in(source: str) -> list[str]:
    """:func:`list_source`, or an InputError when SOURCE holds no image."""
    files = list_source(source)
    if not files:
        raise InputError(f"no images found under {source} (suffixes {', '.join(sorted(SUPPORTED_SUFFIXES))})")
    return files


def predict_with_ray(
    source: str | os.PathLike[str],
    options: PredictOptions | None = None,
    *,
    actors: int | None = None,
    address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RayPredictSummary:
    """Classify every image under ``source`` on Ray Data and stream one row per file to ``options.out``.

    The rows are those :func:`~kidney_edge.runtime.predict.predict_folder` writes for the same
    files (columns :func:`~kidney_edge.runtime.rows.output_columns`), in completion order.
    ``options.threads`` are onnxruntime threads per actor (default :data:`DEFAULT_ACTOR_THREADS`),
    each actor reserving as many CPUs; ``actors`` defaults to the cluster's CPUs // threads.
    ``address`` None starts Ray on this machine (or uses the process's running Ray); "auto"
    or ``ray://host:10001`` joins an existing cluster, where every node needs kidney-edge
    installed and SOURCE readable. ``--precision auto`` is decided by a probe on the driver.
    Ctrl-C ends the run early with ``summary.interrupted`` set; rerun with ``resume``.
    ``options.report``: the triage page at the end; actors return rows only, so it has no
    thumbnails. ``options.series``: the series rows at the end, which read the rows and DICOM
    headers back: local files and csv/jsonl only (auto: none elsewhere).
    """
    config = RayPredictConfig(str(source), options or PredictOptions(), actors=actors, address=address)
    ray = import_ray()
    return run_predict(
        _readable_series(config).job(config.threads),
        list_files=partial(_images_in, config.source),
        start=lambda classifier, summary: RayEngine(ray, config, classifier, summary),
        new_summary=partial(RayPredictSummary, workers=0, address=config.address or "local"),
        open_writer=open_writer,
        progress=progress,
    )


def _readable_series(config: RayPredictConfig) -> PredictOptions:
    """``config.options`` without series rows where they cannot be read back (``--series``
    asked for there: an InputError)."""
    options = config.options
    if options.series is None or series_readable(config.source, options.fmt):
        return options
    if options.series.mode is SeriesMode.ON:
        raise InputError("--series reads predictions and DICOM headers back: it needs csv/jsonl, local files")
    return replace(options, series=None)
