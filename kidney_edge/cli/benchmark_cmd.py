"""`kidney-edge benchmark`: model latency/throughput with onnxruntime, and end-to-end predict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kidney_edge.cli._app import PANEL_EDGE, NowArgument, Renamed, app, console, library_errors
from kidney_edge.runtime import INT8_FILE, MODEL_FILE, BenchmarkConfig
from kidney_edge.runtime.precision import Precision


@app.command(
    rich_help_panel=PANEL_EDGE,
    old_spellings=(
        NowArgument("--images", "FOLDER"),
        Renamed("--batch-sizes", "--batch-size"),
        Renamed("--json", "--out"),
    ),
)
def benchmark(
    folder: Annotated[
        Path | None,
        typer.Argument(
            help="Folder of images: also time predict end to end on it (decode, preprocess, model, "
            "write), as `kidney-edge predict` would run.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            metavar="PATH",
            help=f"Export folder or .onnx file; default: the newest export/*/. With --precision auto, a "
            f"folder, {MODEL_FILE} or {INT8_FILE} times both files of the export side by side; any other "
            ".onnx file is timed alone.",
        ),
    ] = None,
    batch_sizes: Annotated[
        list[int],
        typer.Option(
            "--batch-size",
            metavar="N",
            help="Batch size to time; repeat for several (--batch-size 1 --batch-size 8).",
        ),
    ] = BenchmarkConfig.batch_sizes,  # type: ignore[assignment]
    threads: Annotated[
        list[int] | None,
        typer.Option(
            "--threads",
            metavar="N",
            help="onnxruntime threads to time, one batch at a time; repeat for several (--threads 1 "
            "--threads 2); default: the usable CPUs, plus predict's default layout (batches side by side).",
            show_default=False,
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            metavar="FILE",
            help="Checkpoint of the same weights: adds PyTorch eager (needs torch).",
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
            help="auto: time every model of the export, and predict FOLDER on the one predict would "
            "choose here; fp32/int8: only that one.",
        ),
    ] = BenchmarkConfig.precision,
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="FILE", help="File to write the full record to, as JSON (atomically)."),
    ] = None,
) -> None:
    """Measure model latency and throughput with onnxruntime on this CPU (fp32 and INT8 side by side).

    Model-only rows time the ONNX session on random input of the model's size, per batch size and
    thread count; with FOLDER, one more row times predict end to end.
    """
    from kidney_edge.runtime import run_benchmark

    pytorch_bench = None
    if checkpoint is not None:  # the PyTorch comparison lives outside the torch-free runtime
        from kidney_edge.torch_bench import bench_pytorch as pytorch_bench

    with library_errors(), console.status("benchmarking...") as status:
        result = run_benchmark(
            model,
            batch_sizes=tuple(batch_sizes),
            threads=tuple(threads) if threads else None,
            warmup=warmup,
            iterations=iterations,
            images_dir=folder,
            checkpoint=checkpoint,
            precision=precision,
            json_out=out,
            progress=lambda message: status.update(f"benchmarking: {message}"),
            pytorch_bench=pytorch_bench,
        )
    _render(result)
    if out is not None:
        console.print(f"wrote {out}")


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
