"""`kidney-edge benchmark`: model latency/throughput with onnxruntime, and end-to-end predict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kidney_edge.cli._app import app, console, library_errors
from kidney_edge.runtime import BenchmarkConfig
from kidney_edge.runtime.precision import Precision


@app.command()
def benchmark(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Export folder or .onnx file; default: newest export/*/model.onnx."),
    ] = None,
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")
    ] = ",".join(map(str, BenchmarkConfig.batch_sizes)),
    threads: Annotated[
        str | None, typer.Option("--threads", help="Comma-separated thread counts; default: usable CPUs.")
    ] = None,
    images: Annotated[
        Path | None, typer.Option("--images", help="Folder for an end-to-end predict measurement.")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint", help="Checkpoint of the same weights: adds PyTorch eager (needs torch)."
        ),
    ] = None,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Untimed runs before measuring.")
    ] = BenchmarkConfig.warmup,
    iterations: Annotated[
        int, typer.Option("--iterations", help="Timed runs per configuration.")
    ] = BenchmarkConfig.iterations,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            help="auto: time every model of the export, and predict --images on the one predict would "
            "choose here; fp32/int8: only that one.",
        ),
    ] = BenchmarkConfig.precision,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the full record as JSON (atomically).")
    ] = None,
) -> None:
    """Measure model latency and throughput with onnxruntime on this CPU (fp32 and INT8 side by side)."""
    from kidney_edge.runtime import parse_int_list, run_benchmark

    pytorch_bench = None
    if checkpoint is not None:  # the PyTorch comparison lives outside the torch-free runtime
        from kidney_edge.torch_bench import bench_pytorch as pytorch_bench

    with library_errors(), console.status("benchmarking...") as status:
        result = run_benchmark(
            model,
            batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
            threads=None if threads is None else parse_int_list(threads, "--threads"),
            warmup=warmup,
            iterations=iterations,
            images_dir=images,
            checkpoint=checkpoint,
            precision=precision,
            json_out=json_out,
            progress=lambda message: status.update(f"benchmarking: {message}"),
            pytorch_bench=pytorch_bench,
        )
    _render(result)
    if json_out is not None:
        console.print(f"wrote {json_out}")


def _render(result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"Model-only latency (ms per batch): {result['model']['path']}")
    for name in (
        "runtime",
        "batch",
        "threads",
        "workers",
        "p50",
        "p90",
        "p99",
        "mean",
        "ms/image",
        "images/s",
    ):
        table.add_column(name, justify="left" if name == "runtime" else "right", no_wrap=True)
    rows = list(result["model_only"]) + list((result.get("pytorch") or {}).get("rows", []))
    for row in rows:
        latency = row["latency_ms"]
        engine = "ORT" if row["engine"] == "onnxruntime" else "torch eager"
        table.add_row(
            f"{engine} {row['precision']}", str(row["batch_size"]), str(row["threads"]), str(row.get("workers", 1)),
            *(f"{latency[k]:.2f}" for k in ("p50", "p90", "p99", "mean")),
            f"{row['per_image_ms']['mean']:.2f}", f"{row['images_per_s']:.1f}",
        )  # fmt: skip
    console.print(table)
    console.print(
        "workers > 1: that many batches side by side, as predict runs them (images/s: sustained "
        "throughput; latency: one call among the others)",
        highlight=False,
    )
    skipped = (result.get("pytorch") or {}).get("skipped")
    if skipped:
        console.print(f"PyTorch eager skipped: {skipped}")
    pipeline = result.get("pipeline")
    if pipeline:
        console.print(
            f"end-to-end predict: {pipeline['images']} images in {pipeline['seconds']:.2f} s = "
            f"{pipeline['images_per_s']:.1f} images/s (batch {pipeline['batch_size']}, {pipeline['workers']} "
            f"workers x {pipeline['threads']} threads, first batch after {pipeline['first_batch_s']} s, {pipeline['failed']} failed)",
            highlight=False,
        )
        console.print(f"end-to-end precision {pipeline['precision_reason']}", highlight=False, soft_wrap=True)
    machine = result["machine"]
    isa = ", ".join(flag for flag, present in machine["isa_flags"].items() if present) or "none"
    console.print(
        f"{machine['cpu_model']}, {machine['cores_usable']} usable cores, ISA: {isa}; onnxruntime "
        f"{machine['onnxruntime']}, Python {machine['python']}; load {machine['load_average_1m_5m_15m']}",
        highlight=False,
    )
