"""The boring parts every benchmark shares: the record, whole-process timing, model-only
throughput, shared inputs and the result files. A script keeps only its measurement and its table.

Usage (a script in ``benchmarks/``; import the harness before ``kidney_edge``: it puts this
tree first on ``sys.path``)::

    import _harness as harness
    from kidney_edge.runtime import MODEL_FILE

    record = harness.start_record(model=str(model))   # command, commit, UTC time, machine, load
    only = harness.model_only(model, precision="int8", batch_sizes=(8,))
    run = harness.run_cli(["predict", str(images), "--model", str(model), "--out", str(csv)], out=csv)
    record["ratio"] = run.images_per_s / harness.one_batch_images_per_s(only, batch_size=8)
    record["predict"] = run.to_dict()
    harness.finish_record(record)                       # load average after, finish time
    harness.write_results(RESULTS / "name", record, render(record))  # name.json + name.md, atomic

Key names are the harness's own: ``load_average_before`` / ``load_average_after`` ([1, 5, 15]
minutes) on a record and on every :class:`CliRun`. Records written before the harness used
other names; :func:`recorded_load` and :func:`recorded` read both, so old results re-render
unchanged and nobody edits recorded JSON by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Scripts run the package of the tree they sit in, not an installed copy: the commit a record
# names is then the code that ran.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kidney_edge.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# Whole-process runs get a bytecode cache, as an installed package has one (pip compiles on
# install): without it (PYTHONDONTWRITEBYTECODE=1) every start compiles ~50 modules, ~0.2 s.
PYCACHE = Path(tempfile.gettempdir()) / "kidney-edge-bench" / "pycache"
# /proc/PID/status is read this often during a run: VmHWM only grows, so the last read misses
# at most this much of the end; RssAnon/RssShmem peaks are sampled at this rate.
STATUS_EVERY_S = 0.02
POLL_S = 0.002  # rows on disk are counted this often: the resolution of first_row_s

# --------------------------------------------------------------------------- the record


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    if not hasattr(os, "getloadavg"):
        return None
    return [round(value, 2) for value in os.getloadavg()]


def git_commit() -> str:
    """The short hash of this tree's HEAD ("unknown" outside git)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def command_line() -> str:
    """How this script was run, from the repository root: ``python benchmarks/x.py ARGS``."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return " ".join(["python", str(shown), *sys.argv[1:]])


def log(message: str) -> None:
    """A progress line on stderr with the wall-clock time: long runs show where they are."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    """What the figures depend on: CPU model, usable cores, ISA flags, library versions.

    ``kidney_edge.runtime.machine_info`` without its load average: a record keeps load under
    its own before/after keys."""
    from kidney_edge.runtime import machine_info

    facts = machine_info()
    facts.pop("load_average_1m_5m_15m", None)
    return facts


def start_record(**fields: Any) -> dict[str, Any]:
    """A new record: command line, git commit, UTC start time, machine, load average before,
    then ``fields`` (the script's own settings)."""
    return {"command": command_line(), "commit": git_commit(), "started_utc": utc_now(),
            "machine": machine(), "load_average_before": load_average(), **fields}  # fmt: skip


def finish_record(record: dict[str, Any]) -> dict[str, Any]:
    """Add the UTC finish time and the load average after; returns ``record``."""
    record["finished_utc"] = utc_now()
    record["load_average_after"] = load_average()
    return record


# Names older records used for the same facts (read, never written).
_LEGACY_KEYS = {
    "load_average_before": ("load_average_at_start", "uptime_load_start", "uptime_load_before", "load_before",
                            "loadavg_1_5_15_before", "load_before_timing"),
    "load_average_after": ("uptime_load_end", "uptime_load_after", "load_after", "loadavg_1_5_15_after",
                           "load_average_end"),
    "started_utc": ("started", "created", "date"),
    "machine": ("machine_before",),
    "first_row_s": ("first_batch_s",),
    "peak_shared_mb": ("peak_object_store_mapped_mb",),
}  # fmt: skip


def recorded(record: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``record[key]``, or the value under an older name of the same fact."""
    for name in (key, *_LEGACY_KEYS.get(key, ())):
        if name in record:
            return record[name]
    return default


def recorded_load(record: Mapping[str, Any], when: str) -> list[float] | None:
    """The load average ``"before"`` or ``"after"`` a record or run, under any name it was stored
    with; records that kept it inside a machine snapshot (``machine_before``/``machine_after``)
    included."""
    value = recorded(record, f"load_average_{when}")
    if value is None:
        snapshot = record.get("machine_before" if when == "before" else "machine_after") or {}
        value = snapshot.get("load_average_1m_5m_15m")
    return value


def cpu_kind(machine_facts: Mapping[str, Any]) -> str:
    """The CPU-kind label of a recorded machine (``kidney_edge.runtime.hardware.cpu_kind_label``).
    Results files keep one record per kind: fp32 and INT8 speed depend on it, so no ratio mixes two."""
    from kidney_edge.runtime.hardware import cpu_kind_label

    return cpu_kind_label(
        machine_facts["cpu_model"], machine_facts["isa_flags"], machine_facts["cores_usable"]
    )


# --------------------------------------------------------------------------- result files


def write_results(out: Path, data: Any, markdown: str) -> None:
    """``out``.json and ``out``.md, each written atomically (an interrupted run leaves the old
    file or the new one). The JSON first: the Markdown is rendered from it."""
    atomic_write_json(out.with_suffix(".json"), data)
    atomic_write_text(out.with_suffix(".md"), markdown)


def write_markdown(out: Path, markdown: str) -> None:
    """``out``.md alone, atomically: re-rendering a recorded ``out``.json leaves the JSON as it is."""
    atomic_write_text(out.with_suffix(".md"), markdown)


def read_results(out: Path) -> Any:
    """The recorded ``out``.json, or None when there is none yet."""
    path = out.with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else None


# --------------------------------------------------------------------------- whole-process runs


@dataclass
class CliRun:
    """One ``python -m kidney_edge ...`` process, timed from outside.

    ``peak_rss_mb`` is the process's own VmHWM (not ``ru_maxrss``, which for a forked child also
    counts the parent's memory at the fork; Popen returns only after the exec, so every read is
    of the new program); ``first_row_s`` is when the first output row was on
    disk; ``samples`` are (seconds, rows on disk) at each change of the row count; ``cpu_s`` is
    the process's user + system CPU time (from ``wait4``): on a shared machine it moves far
    less with other people's load than ``wall_s`` does."""

    command: str
    exit_code: int
    wall_s: float
    rows: int
    first_row_s: float | None
    peak_rss_mb: float
    peak_private_mb: float
    peak_shared_mb: float
    load_average_before: list[float] | None
    load_average_after: list[float] | None
    output: str = ""
    samples: list[tuple[float, int]] = field(default_factory=list, repr=False)
    cpu_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return round(self.rows / self.wall_s, 2) if self.wall_s > 0 else 0.0

    @property
    def images_per_cpu_s(self) -> float:
        return round(self.rows / self.cpu_s, 2) if self.cpu_s > 0 else 0.0

    def steady_images_per_s(self, low: float = 0.1, high: float = 0.9) -> float | None:
        """Images/s between the samples where ``low`` and ``high`` of the rows were on disk: the
        running pipeline, without start-up and shut-down."""
        start = next(((t, n) for t, n in self.samples if n >= low * self.rows), None)
        end = next(((t, n) for t, n in self.samples if n >= high * self.rows), None)
        if start is None or end is None or end[0] <= start[0]:
            return None
        return round((end[1] - start[1]) / (end[0] - start[0]), 1)

    def to_dict(self, output_tail: int = 400) -> dict[str, Any]:
        """The JSON form: every field but the samples, the output's tail only on failure."""
        data = {k: v for k, v in asdict(self).items() if k not in ("samples", "output")}
        data["images_per_s"] = self.images_per_s
        data["images_per_cpu_s"] = self.images_per_cpu_s
        data["output_tail"] = self.output[-output_tail:] if self.exit_code not in (0, 3) else ""
        return data


class RowCounter:
    """Rows of a CSV on disk so far (header excluded), reading only what was appended since."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, 0

    def rows(self) -> int:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return max(0, self.lines - 1)


def parse_status_kb(text: str, keys: Sequence[str] = ("VmHWM", "RssAnon", "RssShmem")) -> dict[str, int]:
    """{key: kB} of a /proc/PID/status text, for the ``keys`` present (e.g. ``VmHWM:  1234 kB``)."""
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in keys and rest.split():
            values[name] = int(rest.split()[0])
    return values


def _status_kb(pid: int) -> dict[str, int]:
    try:
        return parse_status_kb(Path(f"/proc/{pid}/status").read_text(encoding="ascii"))
    except (OSError, ValueError):  # the process has just ended, or no /proc
        return {}


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a whole-process run: this one with a bytecode cache (see
    :data:`PYCACHE`) and wide output (COLUMNS: one printed fact per line), plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env.update(COLUMNS="1000", PYTHONPYCACHEPREFIX=str(PYCACHE), **extra)
    return env


def run_cli(args: Sequence[str], *, out: Path | None = None, env: Mapping[str, str] | None = None) -> CliRun:
    """``python -m kidney_edge ARGS`` from the repository root, as a whole process: wall time,
    rows of ``out`` (a CSV it writes; removed first), first row on disk, peak memory, load.

    Output goes to a temporary file, not a pipe: a pipe nobody reads fills up and blocks the run."""
    command = [sys.executable, "-m", "kidney_edge", *map(str, args)]
    if out is not None:
        out.unlink(missing_ok=True)
    counter = RowCounter(out) if out is not None else None
    load_before, peaks, samples = load_average(), {}, []
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=dict(env or cli_env()), stdout=log,
                                   stderr=subprocess.STDOUT, text=True)  # fmt: skip
        next_status = start
        while not (done := os.wait4(process.pid, os.WNOHANG))[0]:
            now = time.perf_counter()
            rows = counter.rows() if counter else 0
            if rows and (not samples or samples[-1][1] != rows):
                samples.append((round(now - start, 3), rows))
            if now >= next_status:
                for key, kb in _status_kb(process.pid).items():
                    peaks[key] = max(peaks.get(key, 0), kb)
                next_status = now + STATUS_EVERY_S
            time.sleep(POLL_S)
        wall_s = time.perf_counter() - start
        # os.wait4 reaped it: tell Popen, which would otherwise wait for it again
        process.returncode = os.waitstatus_to_exitcode(done[1])
        log.seek(0)
        output = log.read()
    rows = counter.rows() if counter else 0
    return CliRun(
        command=" ".join(["kidney-edge", *command[3:]]), exit_code=process.returncode,
        wall_s=round(wall_s, 3), rows=rows, first_row_s=samples[0][0] if samples else None,
        peak_rss_mb=round(peaks.get("VmHWM", 0) / 1024, 1), peak_private_mb=round(peaks.get("RssAnon", 0) / 1024, 1),
        peak_shared_mb=round(peaks.get("RssShmem", 0) / 1024, 1), load_average_before=load_before,
        load_average_after=load_average(), output=output, samples=samples,
        cpu_s=round(done[2].ru_utime + done[2].ru_stime, 3),
    )  # fmt: skip


# --------------------------------------------------------------------------- model-only throughput


def model_only(
    model: Path,
    *,
    precision: str,
    batch_sizes: Sequence[int] = (8,),
    threads: int | None = None,
    iterations: int = 40,
    warmup: int = 5,
) -> dict[str, Any]:
    """``kidney-edge benchmark``'s model-only rows of one precision, as its own process.

    The one way every ratio's model-only denominator is measured: random inputs after
    ``warmup`` calls, one batch at a time on every core, and (without ``threads``) predict's own
    layout, batches side by side. Its own process, like the whole-process runs it is compared
    with, and so that no session or arena of it stays in the harness's process.
    Returns {"command": ..., "rows": [benchmark's model_only rows]}."""
    with tempfile.TemporaryDirectory(prefix="kidney-edge-model-only-") as scratch:
        out = Path(scratch) / "benchmark.json"
        args = ["benchmark", "--model", str(model), "--precision", precision,
                "--batch-sizes", ",".join(map(str, batch_sizes)), *(["--threads", str(threads)] if threads else []),
                "--warmup", str(warmup), "--iterations", str(iterations), "--json", str(out)]  # fmt: skip
        run = run_cli(args)
        if run.exit_code != 0:
            raise RuntimeError(f"kidney-edge {' '.join(args)} failed ({run.exit_code}): {run.output[-2000:]}")
        rows = json.loads(out.read_text())["model_only"]
    return {"command": "kidney-edge " + " ".join(args).replace(str(out), "OUT.json"), "rows": rows}


def _rows_of(measurement: Mapping[str, Any], batch_size: int | None) -> list[dict[str, Any]]:
    rows = [r for r in measurement["rows"] if batch_size is None or r["batch_size"] == batch_size]
    if not rows:
        raise ValueError(f"no model-only row at batch size {batch_size}")
    return rows


def one_batch_images_per_s(measurement: Mapping[str, Any], batch_size: int | None = None) -> float:
    """Model-only images/s one batch at a time on every core (``benchmark``'s latency rows): at
    ``batch_size``, or the best of any batch size when None."""
    rows = [r for r in _rows_of(measurement, batch_size) if r.get("workers", 1) == 1]
    return max(row["images_per_s"] for row in rows)


def best_images_per_s(measurement: Mapping[str, Any], batch_size: int | None = None) -> float:
    """Model-only images/s of the best layout (predict's side by side included): at
    ``batch_size``, or the best of any batch size when None. The model's own ceiling here."""
    return max(row["images_per_s"] for row in _rows_of(measurement, batch_size))


# --------------------------------------------------------------------------- shared inputs


DICOM_SERIES = "dicom-series"  # `synth --format dicom`: the classic phantom as CT series
# name -> (renderer style, phantom difficulty): families that differ the way scans differ; the
# training benchmark (bench_recipe.py) trains on them, others measure on the same folders.
PHANTOM_FAMILIES: dict[str, tuple[str, float]] = {
    "classic-easy": ("classic", 0.25),  # the demo's phantom: conspicuous findings
    "classic": ("classic", 1.0),  # the same renderer at its default difficulty
    "lookalike": ("lookalike", 1.0),  # an independent renderer (kidney_edge/phantoms/lookalike.py)
    # Its patients and findings, every one imaged alike: "cannot see" vs "cannot generalise across
    # scanners". Its file names match "lookalike", so the same splits.csv can be reused.
    "lookalike-one-scanner": ("lookalike-one-scanner", 1.0),
    # The same renderer with its findings drawn larger, more contrasted and less noisy (the
    # `difficulty` of `synth`): where between "cannot see" and "cannot learn" the defaults fail.
    "lookalike-d0.5": ("lookalike", 0.5),
    "lookalike-d0.25": ("lookalike", 0.25),
    # The classic phantom as CT series (findings on some slices only, export quirks), split 70/15/15
    # by series.
    DICOM_SERIES: (DICOM_SERIES, 0.25),
}


def phantom_folder(family: str, phantom_seed: int, n_images: int, slice_size: int) -> str:
    """The folder name of one family's phantom under a benchmark's ``--workdir`` (its
    ``-splits.csv`` sits beside it): one name, so every benchmark reuses the same slices."""
    return f"{family}-d{phantom_seed}-n{n_images}-{slice_size}px"


def phantom_images(cache: Path, n: int) -> Path:
    """n phantom 512 px JPEGs in the Kaggle layout, made once under ``cache`` (seed 0)."""
    from kidney_edge.runtime import scan_images

    folder = cache / f"phantom-{n}-512"
    if folder.is_dir() and len(scan_images(folder)) >= n:
        return folder
    from kidney_edge.phantoms.classic import synthesize

    synthesize(folder, n=n, size=512, seed=0)
    return folder


def linked_folder(source: Path, count: int, cache: Path) -> Path:
    """``count`` hard links cycling over the images of ``source``: a big folder without more disk."""
    from kidney_edge.runtime import scan_images

    folder = cache / f"linked-{count}"
    if folder.is_dir() and len(scan_images(folder)) == count:
        return folder
    images = scan_images(source)
    for index in range(count):
        image = images[index % len(images)]
        target = folder / f"{index // 1000:03d}" / f"slice-{index:06d}{image.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(image, target)
    return folder


def warm_disk_cache(folder: Path) -> None:
    """Read every image once: figures are stated for a warm disk cache."""
    from kidney_edge.runtime import scan_images

    for path in scan_images(folder):
        path.read_bytes()
