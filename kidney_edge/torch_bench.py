"""PyTorch eager on a checkpoint's weights, beside the runtime's onnxruntime figures.

``kidney-edge benchmark --checkpoint`` passes :func:`bench_pytorch` to
:func:`kidney_edge.runtime.run_benchmark`: the runtime times ONNX models without torch, and this
module (training side: it reads checkpoints) times the same batch sizes and thread counts with
the same harness, so the two engines' rows compare.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kidney_edge.runtime.benchmark import BenchmarkConfig, latency_stats, random_batch, time_callable


def bench_pytorch(checkpoint: Path, config: BenchmarkConfig, report: Callable[[str], None]) -> dict[str, Any]:
    """PyTorch eager on the checkpoint's weights; {'skipped': reason} when torch is missing."""
    try:
        import torch
    except ImportError:
        return {"skipped": "PyTorch is not installed (pip install 'kidney-edge[train]')", "rows": []}
    from kidney_edge.checkpoint import load_model

    model, spec = load_model(checkpoint, device="cpu")
    previous_threads = torch.get_num_threads()
    rows = []
    try:
        for threads in config.thread_counts:
            torch.set_num_threads(threads)
            for batch_size in config.batch_sizes:
                report(f"PyTorch eager, batch {batch_size}, {threads} threads")
                batch = torch.from_numpy(random_batch(batch_size, spec.input_size))
                with torch.inference_mode():
                    seconds = time_callable(
                        lambda b=batch: model(b), warmup=config.warmup, iterations=config.iterations
                    )
                rows.append(
                    {"engine": "pytorch-eager", "precision": "fp32", "model": str(checkpoint),
                     "batch_size": batch_size, "threads": threads, "iterations": len(seconds),
                     "torch": torch.__version__, **latency_stats(seconds, batch_size)}
                )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)
    return {"skipped": None, "input_size": spec.input_size, "rows": rows}
