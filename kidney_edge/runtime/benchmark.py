"""Latency and throughput of an exported model on this CPU, and of the whole predict pipeline.

Model-only figures time ``OnnxClassifier.run`` on a fixed random batch after a warm-up:
p50/p90/p99/mean milliseconds per batch and per image, and images/s, for every batch size x
thread count (one batch at a time: latency), and in ``predict``'s own execution layout (several
batches side by side, one per worker: the sustained throughput a folder run can reach), for
fp32 and INT8 side by side when ``model.onnx`` and ``model.int8.onnx`` sit in the same folder (or ``--model`` names the export folder; ``--precision fp32|int8`` keeps one).
PyTorch eager on the same weights is measured when a checkpoint is given, by the function the
caller passes as ``pytorch_bench`` (the CLI passes :func:`kidney_edge.torch_bench.bench_pytorch`):
this module never imports torch or the checkpoint layer.
The end-to-end figure runs :func:`kidney_edge.runtime.predict_folder` on a folder of images, on
the model ``--precision`` picks (see :mod:`kidney_edge.runtime.precision`).
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import InputError, enum_choice
from kidney_edge.io_utils import atomic_write_json
from kidney_edge.runtime.classifier import (
    INT8_FILE,
    MODEL_FILE,
    OnnxClassifier,
    find_default_model,
    is_int8_model,
)
from kidney_edge.runtime.hardware import available_cpus, cpu_info
from kidney_edge.runtime.precision import Precision
from kidney_edge.runtime.predict import ExecutionLayout, PredictOptions, execution_layout, predict_folder
from kidney_edge.runtime.rows import DEFAULT_PREDICTIONS_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkConfig:
    """Options of ``kidney-edge benchmark``."""

    model: Path | None = None
    batch_sizes: tuple[int, ...] = (1, 8)
    threads: tuple[int, ...] | None = None  # None: the usable CPUs, and predict's own layout
    warmup: int = 5
    iterations: int = 50
    images_dir: Path | None = None
    checkpoint: Path | None = None
    precision: Precision = Precision.AUTO  # auto: every model of the export, side by side

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "precision", enum_choice(Precision, self.precision, "--precision"))
        set_(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        set_(self, "threads", tuple(int(t) for t in self.threads) if self.threads else None)
        if not self.batch_sizes or any(not 1 <= b <= 512 for b in self.batch_sizes):
            raise InputError(f"--batch-sizes must be integers in 1..512, got {list(self.batch_sizes)}")
        if any(t < 1 for t in self.threads or ()):
            raise InputError(f"--threads must be integers >= 1, got {list(self.threads or ())}")
        if self.warmup < 0 or self.iterations < 1:
            raise InputError(
                f"--warmup must be >= 0 and --iterations >= 1 (got {self.warmup}, {self.iterations})"
            )
        if self.images_dir is not None and not Path(self.images_dir).is_dir():
            raise InputError(f"--images {self.images_dir} is not a directory")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise InputError(f"--checkpoint {self.checkpoint} does not exist")

    @property
    def thread_counts(self) -> tuple[int, ...]:
        """The thread counts timed one batch at a time: those asked for, else the usable CPUs."""
        return self.threads or (available_cpus(),)


# Times a checkpoint's weights on the config's batch sizes and thread counts -> the record's
# "pytorch" section: {"skipped": reason or None, "input_size": ..., "rows": [...]}.
PytorchBench = Callable[[Path, BenchmarkConfig, Callable[[str], None]], dict[str, Any]]


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """'1,8' -> (1, 8); InputError naming ``flag`` otherwise."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"{flag} takes comma-separated integers such as 1,8; got {text!r}") from None
    if not values:
        raise InputError(f"{flag} needs at least one value, e.g. {flag} 1,8")
    return values


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, ISA flags, library versions and load: what the figures depend on."""
    import onnxruntime

    cpu = cpu_info()
    return {
        "cpu_model": cpu.model,
        "cores_usable": available_cpus(),
        "cores_host": os.cpu_count(),
        "isa_flags": cpu.isa,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m_5m_15m": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
    }


def model_variants(model: Path, precision: Precision = Precision.AUTO) -> dict[str, Path]:
    """{'fp32': ..., 'int8': ...}: both when the export's two files sit side by side (``model``
    is one of them or their folder); only ``precision``'s when it is fp32 or int8."""
    if precision is not Precision.AUTO:
        variants = model_variants(model)
        if precision.value not in variants:
            raise InputError(f"--precision {precision.value}: {model} has no {precision.value} model")
        return {precision.value: variants[precision.value]}
    if model.is_dir():
        model = model / MODEL_FILE
    siblings = {"fp32": model.with_name(MODEL_FILE), "int8": model.with_name(INT8_FILE)}
    if model.name in (MODEL_FILE, INT8_FILE):
        return {kind: path for kind, path in siblings.items() if path.is_file()}
    return {"int8" if is_int8_model(model) else "fp32": model}


def latency_stats(seconds: Sequence[float], batch_size: int) -> dict[str, Any]:
    """Per-run wall times -> batch and per-image percentiles (ms) and throughput (images/s)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    batch = {"p50": np.percentile(ms, 50), "p90": np.percentile(ms, 90), "p99": np.percentile(ms, 99)}
    batch["mean"] = ms.mean()
    return {
        "latency_ms": {k: round(float(v), 4) for k, v in batch.items()},
        "per_image_ms": {k: round(float(v) / batch_size, 4) for k, v in batch.items()},
        "images_per_s": round(float(batch_size * len(ms) / (ms.sum() / 1000.0)), 2),
    }


def time_callable(run: Callable[[], Any], *, warmup: int, iterations: int) -> list[float]:
    """Wall seconds of each of ``iterations`` calls of ``run``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_side_by_side(
    run: Callable[[], Any], *, workers: int, warmup: int, iterations: int
) -> tuple[list[float], float]:
    """``iterations`` calls of ``run`` shared by ``workers`` threads calling it side by side, after
    ``warmup`` untimed calls each: (each call's wall seconds, wall seconds of them all)."""
    seconds: list[float] = []

    def worker(calls: int) -> None:
        for _ in range(warmup):
            run()
        barrier.wait()
        for _ in range(calls):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)  # list.append is atomic under the GIL

    shares = [iterations // workers + (i < iterations % workers) for i in range(workers)]
    barrier = threading.Barrier(workers + 1)
    threads = [threading.Thread(target=worker, args=(calls,)) for calls in shares]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return seconds, time.perf_counter() - start


def random_batch(batch_size: int, input_size: int) -> np.ndarray:
    """The timed input: normalised CT-like values around 0 with unit spread; (N, 3, S, S) float32."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(batch_size, 3, input_size, input_size)).astype(np.float32)


def benchmark_layouts(config: BenchmarkConfig) -> list[ExecutionLayout]:
    """One batch at a time on each thread count; without ``--threads``, also ``predict``'s
    default layout when it differs (several batches side by side)."""
    layouts = [ExecutionLayout(workers=1, threads=t) for t in config.thread_counts]
    default = execution_layout()
    return layouts if config.threads or default in layouts else [*layouts, default]


def bench_onnx(
    variants: dict[str, Path], config: BenchmarkConfig, report: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Model-only rows of each variant for every layout x batch size (see :func:`benchmark_layouts`).

    ``images_per_s`` is images over the wall time of all timed calls; with several workers the
    latency figures are those of one call among others running beside it.
    """
    rows = []
    for precision, path in variants.items():
        for layout in benchmark_layouts(config):
            classifier = OnnxClassifier(path, threads=layout.threads)
            for batch_size in config.batch_sizes:
                side_by_side = f" x {layout.workers} workers" if layout.workers > 1 else ""
                report(f"onnxruntime {precision}, batch {batch_size}, {layout.threads} threads{side_by_side}")
                batch = random_batch(batch_size, classifier.input_size)
                call = lambda c=classifier, b=batch: c.run(b)  # noqa: E731
                wall_s = None  # one batch at a time: images/s follows from the calls' own times
                if layout.workers == 1:
                    seconds = time_callable(call, warmup=config.warmup, iterations=config.iterations)
                else:
                    iterations = max(config.iterations, layout.workers)
                    seconds, wall_s = time_side_by_side(
                        call, workers=layout.workers, warmup=config.warmup, iterations=iterations
                    )
                stats = latency_stats(seconds, batch_size)
                if wall_s is not None:
                    stats["images_per_s"] = round(batch_size * len(seconds) / wall_s, 2)
                rows.append(
                    {"engine": "onnxruntime", "precision": precision, "model": str(path),
                     "batch_size": batch_size, "threads": layout.threads, "workers": layout.workers,
                     "iterations": len(seconds), **stats}
                )  # fmt: skip
    return rows


def bench_pipeline(
    model: Path,
    images_dir: Path,
    *,
    batch_size: int,
    threads: int | None,
    precision: Precision = Precision.AUTO,
) -> dict[str, Any]:
    """End-to-end predict (scan, decode, preprocess, infer, write CSV) on a folder of images."""
    with tempfile.TemporaryDirectory(prefix="kidney-edge-bench-") as scratch:
        summary = predict_folder(
            images_dir,
            PredictOptions(
                model=model,
                out=Path(scratch) / DEFAULT_PREDICTIONS_FILE,
                batch_size=batch_size,
                threads=threads,
                precision=precision,
            ),
        )
    return {
        "images_dir": str(images_dir),
        "model": str(summary.model),
        "precision": summary.precision,
        "precision_reason": summary.precision_reason,
        "images": summary.processed,
        "failed": summary.failed,
        "batch_size": batch_size,
        "threads": summary.threads,
        "workers": summary.workers,
        "seconds": round(summary.wall_s, 4),
        "first_batch_s": None if summary.first_batch_s is None else round(summary.first_batch_s, 4),
        "images_per_s": round(summary.images_per_s, 2),
    }


def _layout_key(row: dict[str, Any]) -> tuple[int, int, int]:
    return row["batch_size"], row["threads"], row["workers"]


def int8_speedup(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """INT8 images/s over fp32 images/s for each (batch size, threads, workers) measured in both."""
    fp32 = {_layout_key(r): r for r in rows if r["precision"] == "fp32"}
    speedups = []
    for row in rows:
        key = _layout_key(row)
        if row["precision"] == "int8" and key in fp32:
            ratio = row["images_per_s"] / fp32[key]["images_per_s"]
            speedups.append(
                {"batch_size": key[0], "threads": key[1], "workers": key[2], "speedup": round(ratio, 3)}
            )
    return speedups


def run_benchmark(
    model: str | os.PathLike[str] | None = None,
    *,
    batch_sizes: Sequence[int] = BenchmarkConfig.batch_sizes,
    threads: Sequence[int] | None = None,
    warmup: int = BenchmarkConfig.warmup,
    iterations: int = BenchmarkConfig.iterations,
    images_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    precision: Precision | str = BenchmarkConfig.precision,
    json_out: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    pytorch_bench: PytorchBench | None = None,
) -> dict[str, Any]:
    """Benchmark ``model`` (default: newest export) and return (and optionally write) the record.

    ``checkpoint`` needs ``pytorch_bench``, which times it on the same settings (the record's
    ``pytorch`` section).
    """
    config = BenchmarkConfig(
        model=None if model is None else Path(model),
        batch_sizes=tuple(batch_sizes),
        threads=None if threads is None else tuple(threads),
        warmup=warmup,
        iterations=iterations,
        images_dir=None if images_dir is None else Path(images_dir),
        checkpoint=None if checkpoint is None else Path(checkpoint),
        precision=precision,
    )
    if config.checkpoint is not None and pytorch_bench is None:
        raise TypeError("checkpoint= needs pytorch_bench= (kidney_edge.torch_bench.bench_pytorch) to time it")
    report = progress or (lambda message: log.info("benchmark: %s", message))
    model_path = config.model or find_default_model()
    if not model_path.exists():
        raise InputError(f"--model {model_path} does not exist")
    variants = model_variants(model_path, config.precision)
    if not variants:
        raise InputError(f"--model {model_path} has neither {MODEL_FILE} nor {INT8_FILE}")
    spec = OnnxClassifier(next(iter(variants.values())), threads=1).spec
    result: dict[str, Any] = {
        "kind": "kidney-edge-benchmark",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "model": {"path": str(model_path), "variants": {k: str(v) for k, v in variants.items()},
                  "arch": spec.arch, "input_size": spec.input_size, "class_names": list(spec.class_names)},
        "settings": {"batch_sizes": list(config.batch_sizes), "threads": list(config.thread_counts),
                     "warmup": config.warmup, "iterations": config.iterations,
                     "precision": config.precision.value},
        "model_only": bench_onnx(variants, config, report),
        "pytorch": None if config.checkpoint is None else pytorch_bench(config.checkpoint, config, report),
        "pipeline": None,
    }  # fmt: skip
    result["int8_speedup"] = int8_speedup(result["model_only"])
    if result["pytorch"] and result["pytorch"].get("input_size") not in (None, spec.input_size):
        log.warning("the checkpoint's input size differs from the ONNX model's: not the same weights?")
    if config.images_dir is not None:
        report(f"end-to-end predict on {config.images_dir}")
        # auto: the model predict would choose here; forced: that variant's file
        forced = config.precision is not Precision.AUTO
        result["pipeline"] = bench_pipeline(
            variants[config.precision.value] if forced else model_path,
            config.images_dir,
            batch_size=max(config.batch_sizes),
            threads=max(config.threads) if config.threads else None,  # None: predict's layout
            precision=config.precision,
        )
    if json_out is not None:
        atomic_write_json(json_out, result)
    return result
