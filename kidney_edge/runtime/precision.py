"""Which of an export's models runs on this machine, fp32 or INT8, decided when it is loaded.

An export folder (``kidney-edge export``) holds ``model.onnx``, ``model.int8.onnx`` when the
INT8 copy passed its accuracy gate (or was kept with ``--allow-int8-drop``), and
``parity.json`` whose ``int8`` section is the gate record. Whether INT8 is worth running
depends on the CPU that runs it, not on the one that exported it: recorded Lite0 INT8 ran
1.5-3.0x faster than fp32 at batch 8 on an AVX-512 VNNI Xeon and 0.87-0.91x of fp32 on an AVX2
EPYC without VNNI (benchmarks/results/int8.md). So ``auto`` measures both models on this CPU (a probe of a few
batches) instead of trusting an instruction-set table, and picks INT8 only when its gate
passed **and** it is at least :data:`MIN_INT8_SPEEDUP` times faster. Probe results are cached
per machine (CPU model, instruction sets, threads, onnxruntime version) and per model pair
(sha256 of both files) in :data:`PROBE_CACHE_FILE` beside the models, or in the temp folder
when the export folder is read-only.

``--precision fp32|int8`` forces a file. Forcing INT8 whose gate failed (a file kept with
``--allow-int8-drop``) is allowed, with a warning in the choice: the user asked twice. INT8 that
the gate rejected at export (``model.int8.rejected.onnx``) is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kidney_edge.errors import InputError, enum_choice
from kidney_edge.io_utils import atomic_write_json
from kidney_edge.runtime.classifier import (
    INT8_FILE,
    MODEL_FILE,
    PARITY_FILE,
    REJECTED_INT8_FILE,
    OnnxClassifier,
    find_default_model,
    is_int8_model,
)
from kidney_edge.runtime.hardware import available_cpus, cpu_info, cpu_kind

log = logging.getLogger(__name__)

PROBE_CACHE_FILE = "precision_probe.json"
_PROBE_CACHE_VERSION = 1
_MAX_CACHE_ENTRIES = 32  # one per machine x thread count x batch: a shared folder stays small

# INT8 costs up to the gate's 1 point of accuracy, so it must win clearly, not by probe noise.
# On the recorded machines INT8 runs at 0.87-0.91x (AVX2) or 1.5-3.0x (AVX-512 VNNI) of fp32
# (benchmarks/results/int8.md), far from this line either way.
MIN_INT8_SPEEDUP = 1.10
# The probe times at most this batch size: per-image cost is flat from batch 8 up (int8.md),
# and a larger probe batch would cost seconds on a slow CPU.
MAX_PROBE_BATCH = 8


class Precision(str, Enum):
    """``--precision``: which model of an export folder runs."""

    AUTO = "auto"  # INT8 when its gate passed and the probe measures it faster on this CPU
    FP32 = "fp32"
    INT8 = "int8"


@dataclass(frozen=True)
class ProbeResult:
    """Per-image milliseconds of both models on this CPU (the best of the timed batches)."""

    fp32_ms_per_image: float
    int8_ms_per_image: float
    batch_size: int
    threads: int
    batches: int  # timed batches per model
    seconds: float  # wall time of the probe, warm-up included
    cpu: str = ""  # the CPU kind it was measured on (hardware.cpu_kind)

    @property
    def speedup(self) -> float:
        """fp32 time / INT8 time: above 1 when INT8 is faster."""
        return self.fp32_ms_per_image / max(self.int8_ms_per_image, 1e-9)


class Probe(Protocol):
    """Measures two loaded models on this CPU at ``batch_size``; tests inject fakes."""

    def __call__(self, fp32: OnnxClassifier, int8: OnnxClassifier, *, batch_size: int) -> ProbeResult: ...


@dataclass(frozen=True)
class TimedProbe:
    """The real probe: ``warmup`` untimed batches each, then interleaved timed batches of both
    (fp32, INT8, fp32, ...) until both have ``min_batches`` and ``budget_s`` has passed, or
    ``max_batches``. Interleaving makes load from other processes hit both models alike; the
    best batch of each is kept because interference only ever adds time."""

    warmup: int = 1
    min_batches: int = 3
    max_batches: int = 8
    budget_s: float = 0.3

    def __call__(self, fp32: OnnxClassifier, int8: OnnxClassifier, *, batch_size: int) -> ProbeResult:
        started = time.perf_counter()
        size = fp32.input_size
        batch = np.random.default_rng(0).normal(size=(batch_size, 3, size, size)).astype(np.float32)
        for _ in range(self.warmup):
            fp32.run(batch)
            int8.run(batch)
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        timed_from = time.perf_counter()
        while len(times["int8"]) < self.max_batches:
            for name, classifier in (("fp32", fp32), ("int8", int8)):
                start = time.perf_counter()
                classifier.run(batch)
                times[name].append(time.perf_counter() - start)
            if len(times["int8"]) >= self.min_batches and time.perf_counter() - timed_from >= self.budget_s:
                break
        return ProbeResult(
            fp32_ms_per_image=round(min(times["fp32"]) * 1000 / batch_size, 4),
            int8_ms_per_image=round(min(times["int8"]) * 1000 / batch_size, 4),
            batch_size=batch_size,
            threads=fp32.threads,
            batches=len(times["int8"]),
            seconds=round(time.perf_counter() - started, 4),
            cpu=cpu_kind(),
        )


@dataclass(frozen=True)
class Int8Gate:
    """The export's INT8 accuracy gate record, as far as a runtime needs it."""

    passed: bool | None  # None: no record for model.int8.onnx
    summary: str  # one line: the gated deltas, or the failures, or why there is no record
    export_speed: dict[str, Any] | None = None  # the export's own probe of this pair (with its machine)


@dataclass(frozen=True)
class PrecisionChoice:
    """The model file to load and why. ``precision`` is FP32 or INT8, never AUTO."""

    path: Path
    precision: Precision
    requested: Precision
    reason: str
    gate: Int8Gate | None = None  # None: a single file was given
    probe: ProbeResult | None = None
    probe_cached: bool = False
    warning: str | None = None  # set when a forced choice overrides a failed or missing gate

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (benchmark and bench scripts store it)."""
        probe = (
            None if self.probe is None else {**asdict(self.probe), "speedup": round(self.probe.speedup, 3)}
        )
        return {
            "path": str(self.path),
            "precision": self.precision.value,
            "requested": self.requested.value,
            "reason": self.reason,
            "gate": None if self.gate is None else asdict(self.gate),
            "probe": probe,
            "probe_cached": self.probe_cached,
            "warning": self.warning,
        }


# --------------------------------------------------------------------------- gate record


def read_int8_gate(folder: Path) -> Int8Gate:
    """The gate record of ``folder/model.int8.onnx`` from ``folder/parity.json``.

    ``passed`` is True only when the record says it passed *and* names model.int8.onnx as the
    file it kept; a missing or unreadable record is ``None`` (not proven), never a pass.
    """
    record_path = folder / PARITY_FILE
    try:
        record = json.loads(record_path.read_text(encoding="utf-8")).get("int8")
    except FileNotFoundError:
        return Int8Gate(None, f"no {PARITY_FILE} beside the models")
    except (OSError, ValueError, AttributeError) as exc:
        return Int8Gate(None, f"{record_path} is unreadable ({type(exc).__name__})")
    if not isinstance(record, dict) or "passed" not in record:
        return Int8Gate(None, f"{record_path} has no INT8 gate record")
    if record.get("model") not in (None, INT8_FILE):
        return Int8Gate(None, f"{record_path}'s INT8 gate record is about {record['model']}, not {INT8_FILE}")
    if not record["passed"]:
        failures = "; ".join(record.get("failures") or []) or "failed"
        return Int8Gate(False, f"INT8 accuracy gate failed at export: {failures}")
    speed = record.get("speed") if isinstance(record.get("speed"), dict) else None
    return Int8Gate(True, f"INT8 accuracy gate passed at export ({_gate_deltas(record)})", speed)


def _gate_deltas(record: dict[str, Any]) -> str:
    delta = (record.get("delta") or {}).get("rule") or {}
    positive = record.get("positive_class") or "positive class"
    parts = []
    for key, name in (("macro_f1", "macro-F1"), ("positive_recall", f"{positive} recall")):
        if isinstance(delta.get(key), int | float):
            parts.append(f"{name} {delta[key] * 100:+.2f} pt")
    parts.append(f"{record.get('n_images', '?')} test images")
    agreement = record.get("agreement") or {}
    if isinstance(agreement.get("rule"), int | float):
        parts.append(f"agreement with fp32 {agreement['rule']:.1%} on {agreement.get('n_images', '?')} images")
    return ", ".join(parts)


# --------------------------------------------------------------------------- probe cache


def machine_key(threads: int) -> dict[str, Any]:
    """What INT8-vs-fp32 speed depends on besides the models: CPU, instruction sets, threads."""
    import onnxruntime

    info = cpu_info()
    return {
        "cpu": info.model,
        "machine": info.machine,
        "isa": sorted(flag for flag, present in info.isa.items() if present),
        "threads": threads,
        "onnxruntime": onnxruntime.__version__,
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_key(fp32: Path, int8: Path, threads: int, batch_size: int) -> dict[str, Any]:
    return {
        **machine_key(threads),
        "batch_size": batch_size,
        "fp32_sha256": file_sha256(fp32),
        "int8_sha256": file_sha256(int8),
    }


def probe_cache_paths(folder: Path) -> tuple[Path, Path]:
    """(beside the models, in the temp folder): read in this order; written to the first that works."""
    tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return folder / PROBE_CACHE_FILE, Path(tempfile.gettempdir()) / "kidney-edge" / f"precision-{tag}.json"


def _read_cache(path: Path) -> list[dict[str, Any]]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.debug("ignoring the probe cache %s: %s", path, exc)
        return []
    if not isinstance(record, dict) or record.get("version") != _PROBE_CACHE_VERSION:
        return []
    return [entry for entry in record.get("entries", []) if isinstance(entry, dict)]


def cached_probe(folder: Path, key: dict[str, Any]) -> ProbeResult | None:
    for path in probe_cache_paths(folder):
        for entry in _read_cache(path):
            if entry.get("key") == key:
                try:
                    return ProbeResult(**entry["result"])
                except (KeyError, TypeError):
                    break  # an entry of another layout: measure again
    return None


def store_probe(folder: Path, key: dict[str, Any], result: ProbeResult) -> Path | None:
    """Add ``result`` to the first writable cache file; returns it (None when none was writable)."""
    entry = {"key": key, "result": asdict(result), "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for path in probe_cache_paths(folder):
        entries = [e for e in _read_cache(path) if e.get("key") != key][-(_MAX_CACHE_ENTRIES - 1) :]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"version": _PROBE_CACHE_VERSION, "entries": [*entries, entry]})
            return path
        except OSError as exc:
            log.debug("cannot write the probe cache %s: %s", path, exc)
    log.info("the INT8 probe result could not be cached; it will be measured again next time")
    return None


def export_probe(gate: Int8Gate, key: dict[str, Any]) -> ProbeResult | None:
    """The export's own measurement of this model pair, when it was made on this machine (same
    CPU, instruction sets, threads, onnxruntime) at the probe's batch: export and predict then
    time the same thing. On another CPU kind, None: the runtime probes again."""
    speed = gate.export_speed or {}
    machine = speed.get("machine")
    if not isinstance(machine, dict) or speed.get("batch_size") != key["batch_size"]:
        return None
    if any(machine.get(name) != key[name] for name in ("cpu", "machine", "isa", "threads", "onnxruntime")):
        return None
    try:
        return ProbeResult(float(speed["fp32_ms_per_image"]), float(speed["int8_ms_per_image"]),
                           int(speed["batch_size"]), int(speed["threads"]), batches=0, seconds=0.0,
                           cpu=str(speed.get("cpu", "")))  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return None


def _exported_on(gate: Int8Gate, result: ProbeResult) -> str:
    """Where the INT8 file was made and measured, when that is another CPU kind than this one."""
    made_on = (gate.export_speed or {}).get("cpu")
    if not made_on or made_on == result.cpu or not result.cpu:
        return ""
    return f"; INT8 made on {made_on}, probed again on {result.cpu}"


# --------------------------------------------------------------------------- the choice


def resolve_precision(
    model: str | os.PathLike[str] | None,
    precision: Precision | str = Precision.AUTO,
    *,
    batch_size: int | None = None,
    threads: int | None = None,
    probe: Probe | None = None,
    load: Callable[[Path], OnnxClassifier] | None = None,
) -> tuple[PrecisionChoice, OnnxClassifier]:
    """The model to run for ``model`` (an export folder, an .onnx file, or None for the newest
    export folder) under ``precision``, and that model loaded. ``batch_size`` is the batch the
    INT8 probe times (at most :data:`MAX_PROBE_BATCH`; None: that many).

    ``load`` builds a classifier from a path (default ``OnnxClassifier(path, threads=threads)``;
    pass one to add options, with the same ``threads``, which the probe cache is keyed by). The
    probe's session of the chosen model is returned, so probing costs one extra session load.
    Raises InputError for a missing model or a forced precision the folder or file lacks.
    """
    precision = enum_choice(Precision, precision, "--precision")
    threads = threads or available_cpus()
    load = load or partial(OnnxClassifier, threads=threads)
    folder = find_default_model().parent if model is None else Path(model)
    if not folder.is_dir():
        choice = _single_file(folder, precision)
        return choice, load(choice.path)
    fp32, int8 = folder / MODEL_FILE, folder / INT8_FILE
    if not fp32.is_file() and not int8.is_file():
        raise InputError(
            f"--model {folder} has neither {MODEL_FILE} nor {INT8_FILE}; pass an export folder "
            "written by `kidney-edge export`, or an .onnx file"
        )
    gate = read_int8_gate(folder)
    if precision is Precision.FP32 or (precision is Precision.AUTO and not int8.is_file()):
        choice = _fp32_choice(folder, precision, gate)
    elif precision is Precision.INT8 or not fp32.is_file():
        choice = _int8_choice(int8, precision, gate)
    elif gate.passed is not True:  # no probe: a faster wrong answer is not on offer
        unproven = gate.summary if gate.passed is False else f"INT8 not proven ({gate.summary})"
        choice = PrecisionChoice(fp32, Precision.FP32, precision, f"fp32: {unproven}", gate)
    else:
        return _probed_choice(folder, gate, batch_size, threads, probe or TimedProbe(), load)
    return choice, load(choice.path)


def _single_file(path: Path, precision: Precision) -> PrecisionChoice:
    if not path.is_file():
        raise InputError(f"--model {path}: no such file or export folder")
    kind = Precision.INT8 if is_int8_model(path) else Precision.FP32
    if precision is Precision.AUTO:
        reason = f"{kind.value}: the file given (pass the export folder to choose by this CPU's speed)"
        return PrecisionChoice(path, kind, precision, reason)
    if precision is not kind:
        raise InputError(
            f"--model {path} is an {kind.value} model but --precision {precision.value} was asked; "
            f"pass the export folder {path.parent} (it holds both), or --precision auto"
        )
    return PrecisionChoice(path, kind, precision, f"{kind.value}: forced (--precision {precision.value})")


def _fp32_choice(folder: Path, precision: Precision, gate: Int8Gate) -> PrecisionChoice:
    fp32 = folder / MODEL_FILE
    if not fp32.is_file():
        raise InputError(f"--precision fp32: {folder} has no {MODEL_FILE}; pass --precision auto or int8")
    if precision is Precision.FP32:
        return PrecisionChoice(fp32, Precision.FP32, precision, "fp32: forced (--precision fp32)", gate)
    if (folder / REJECTED_INT8_FILE).is_file():
        reason = f"fp32: the INT8 copy failed its accuracy gate at export ({REJECTED_INT8_FILE})"
    else:
        reason = f"fp32: the export has no {INT8_FILE}"
    return PrecisionChoice(fp32, Precision.FP32, precision, reason, gate)


def _int8_choice(int8: Path, precision: Precision, gate: Int8Gate) -> PrecisionChoice:
    folder = int8.parent
    if not int8.is_file():
        rejected = (folder / REJECTED_INT8_FILE).is_file()
        why = (
            f"its INT8 copy failed the accuracy gate and was kept only as {REJECTED_INT8_FILE}, which is never "
            "loaded (re-export with --allow-int8-drop to keep it anyway)"
            if rejected
            else f"it has no {INT8_FILE} (export without --no-int8)"
        )
        raise InputError(f"--precision int8: {folder} cannot run INT8: {why}; pass --precision fp32 or auto")
    forced = precision is Precision.INT8
    how = "forced (--precision int8)" if forced else f"the export has no {MODEL_FILE}"
    warning = None
    if gate.passed is not True:
        warning = f"running INT8 without a passed accuracy gate: {gate.summary}"
    reason = f"int8: {how}; {gate.summary}"
    return PrecisionChoice(int8, Precision.INT8, precision, reason, gate, warning=warning)


def _probed_choice(
    folder: Path,
    gate: Int8Gate,
    batch_size: int | None,
    threads: int,
    probe: Probe,
    load: Callable[[Path], OnnxClassifier],
) -> tuple[PrecisionChoice, OnnxClassifier]:
    fp32, int8 = folder / MODEL_FILE, folder / INT8_FILE
    probe_batch = max(1, min(batch_size or MAX_PROBE_BATCH, MAX_PROBE_BATCH))  # None: the most it times
    key = _cache_key(fp32, int8, threads, probe_batch)
    result = cached_probe(folder, key)
    source = "cached probe" if result is not None else ""
    if result is None and (result := export_probe(gate, key)) is not None:
        source = "measured at export on this machine"
    cached = result is not None
    if result is None:
        fp32_model, int8_model = load(fp32), load(int8)
        result = probe(fp32_model, int8_model, batch_size=probe_batch)
        store_probe(folder, key, result)
        log.info("INT8 probe: %.2fx of fp32 speed in %.2f s", result.speedup, result.seconds)
    faster = result.speedup >= MIN_INT8_SPEEDUP
    chosen, precision = (int8, Precision.INT8) if faster else (fp32, Precision.FP32)
    measured = (
        f"INT8 {result.int8_ms_per_image:.2f} vs fp32 {result.fp32_ms_per_image:.2f} ms/image = "
        f"{result.speedup:.2f}x on this CPU (batch {result.batch_size}, {result.threads} threads"
        f"{', ' + source if source else ''})"
    )
    verdict = "faster" if faster else f"not faster by {MIN_INT8_SPEEDUP:.2f}x"
    reason = f"{precision.value}: {gate.summary}; {measured}: {verdict}{_exported_on(gate, result)}"
    choice = PrecisionChoice(chosen, precision, Precision.AUTO, reason, gate, result, cached)
    if cached:
        return choice, load(chosen)
    return choice, int8_model if faster else fp32_model
