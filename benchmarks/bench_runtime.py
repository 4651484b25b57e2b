"""Reproduce the edge-runtime table of issue 7 on this machine and record it.

    python benchmarks/bench_runtime.py [--model export/RUN/model.onnx] [--images DIR]

Measures, in one run and with the same thread count:
- model-only latency/throughput (``kidney_edge.runtime.run_benchmark``): batch 1 and 8, fp32 and
  INT8 side by side when ``model.int8.onnx`` sits beside ``model.onnx``;
- end-to-end ``kidney-edge predict`` on 2,000 phantom 512 px JPEGs, timed as a whole process
  (start-up included) -> images/s and its ratio to model-only fp32 at batch 8 (target >= 0.7);
- process start to the first batch on disk (target < 1 s with a warm disk cache);
- peak RSS of predict on 2,000 and on 10,000 files (target < 400 MB, flat in folder size).

Writes benchmarks/results/runtime.json and runtime.md (atomically). Phantom images are made
once with kidney_edge.phantom.synthesize under --cache (not in git).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kidney_edge.io_utils import atomic_write_json, atomic_write_text  # noqa: E402
from kidney_edge.runtime import (  # noqa: E402
    available_cpus,
    find_default_model,
    machine_info,
    run_benchmark,
    scan_images,
)

TARGET_RATIO, TARGET_RSS_MB, TARGET_STARTUP_S = 0.7, 400.0, 1.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="fp32 model.onnx (default: newest export/*/model.onnx)")
    parser.add_argument("--images", type=Path, help="folder of 512 px JPEGs (default: phantom under --cache)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kidney-edge-bench")
    parser.add_argument("--n", type=int, default=2000, help="images for the end-to-end run")
    parser.add_argument("--rss-files", type=int, default=10_000, help="files for the peak-RSS run (0: skip)")
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--checkpoint", type=Path, help="adds PyTorch eager on the same weights")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "runtime")
    parser.add_argument("--note", default="", help="free text stored with the results (model provenance...)")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite OUT.md from OUT.json, measure nothing"
    )
    return parser.parse_args()


def phantom_images(cache: Path, n: int) -> Path:
    """n phantom 512 px JPEGs (made once); gray noise JPEGs if the phantom generator is missing."""
    folder = cache / f"phantom-{n}-512"
    if folder.is_dir() and len(scan_images(folder)) >= n:
        return folder
    try:
        from kidney_edge.phantom import synthesize

        synthesize(folder, n=n, size=512, seed=0)
    except ImportError:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        for index in range(n):
            path = folder / f"img-{index:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8), "L").save(path, quality=90)
    return folder


def linked_folder(source: Path, count: int, cache: Path) -> Path:
    """`count` hard links cycling over the source images: a big folder without more disk."""
    folder = cache / f"linked-{count}"
    if folder.is_dir() and len(scan_images(folder)) == count:
        return folder
    images = scan_images(source)
    for index in range(count):
        target = folder / f"{index // 1000:03d}" / f"slice-{index:06d}{images[index % len(images)].suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(images[index % len(images)], target)
    return folder


def warm_disk_cache(images: Path) -> None:
    """Read every file once: the start-up target is stated for a warm disk cache."""
    for path in scan_images(images):
        path.read_bytes()


def timed_predict(model: Path, images: Path, threads: int, out: Path) -> dict[str, Any]:
    """Run `kidney-edge predict` as a process: wall time, time to the first row on disk, peak RSS."""
    command = [sys.executable, "-m", "kidney_edge", "predict", str(images), "--model", str(model),
               "--out", str(out), "--batch-size", "8", "--threads", str(threads)]  # fmt: skip
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_batch_s = None
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if first_batch_s is None and out.exists() and out.read_bytes()[: 1 << 16].count(b"\n") >= 2:
            first_batch_s = time.perf_counter() - start  # header + the first batch's rows
        time.sleep(0.002)
    wall_s = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    rows = out.read_bytes().count(b"\n") - 1
    return {
        "command": " ".join(command),
        "exit_code": process.returncode,
        "rows": rows,
        "wall_s": round(wall_s, 3),
        "images_per_s": round(rows / wall_s, 2),
        "first_batch_s": None if first_batch_s is None else round(first_batch_s, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
        "stderr_tail": process.stderr.read().decode(errors="replace")[-500:] if process.stderr else "",
    }


def main() -> None:
    args = parse_args()
    if args.render_only:
        record = json.loads(args.out.with_suffix(".json").read_text())
    else:
        record = measure(args)
        atomic_write_json(args.out.with_suffix(".json"), record)
    atomic_write_text(args.out.with_suffix(".md"), markdown(record))
    print(markdown(record))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or find_default_model(REPO / "export")
    images = args.images or phantom_images(args.cache, args.n)
    scratch = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    load_before = os.getloadavg()
    try:
        warm_disk_cache(images)
        model_only = run_benchmark(model, batch_sizes=(1, 8), threads=sorted({1, args.threads}),
                                   iterations=args.iterations, checkpoint=args.checkpoint)  # fmt: skip
        end_to_end = timed_predict(model, images, args.threads, scratch / "e2e.csv")
        rss_big = None
        if args.rss_files:
            big = linked_folder(images, args.rss_files, args.cache)
            rss_big = timed_predict(model, big, args.threads, scratch / "rss.csv")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fp32_b8 = next(r for r in model_only["model_only"]
                   if r["precision"] == "fp32" and r["batch_size"] == 8 and r["threads"] == args.threads)  # fmt: skip
    return {
        "machine": machine_info(),
        "load_average_at_start": [round(x, 2) for x in load_before],
        "model": str(model),
        "note": args.note,
        "threads": args.threads,
        "model_only": model_only,
        "end_to_end": end_to_end,
        "peak_rss_large_folder": rss_big,
        "targets": targets(end_to_end, fp32_b8, rss_big),
    }


def targets(end_to_end: dict, fp32_b8: dict, rss_big: dict | None) -> dict[str, Any]:
    ratio = end_to_end["images_per_s"] / fp32_b8["images_per_s"]
    rss = max(end_to_end["peak_rss_mb"], rss_big["peak_rss_mb"] if rss_big else 0.0)
    return {
        "end_to_end_over_model_only": {"value": round(ratio, 3), "target": f">= {TARGET_RATIO}",
                                       "met": ratio >= TARGET_RATIO},
        "peak_rss_mb": {"value": rss, "target": f"< {TARGET_RSS_MB}", "met": rss < TARGET_RSS_MB},
        "first_batch_s": {"value": end_to_end["first_batch_s"], "target": f"< {TARGET_STARTUP_S}",
                          "met": (end_to_end["first_batch_s"] or 1e9) < TARGET_STARTUP_S},
    }  # fmt: skip


def markdown(record: dict[str, Any]) -> str:
    machine = record["machine"]
    isa = ", ".join(flag for flag, present in machine["isa_flags"].items() if present) or "none"
    lines = [
        "# Edge runtime benchmark (benchmarks/bench_runtime.py)",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cores_usable']} usable cores, ISA {isa}; onnxruntime "
        f"{machine['onnxruntime']}, Python {machine['python']}. Load average at start "
        f"{record['load_average_at_start']}, at the end {machine['load_average_1m_5m_15m']} "
        "(a load above the core count means other jobs shared the CPUs: figures are pessimistic).",
        f"Model: `{record['model']}`; {record['threads']} threads.",
        "",
        f"Notes: {record.get('note') or '-'}",
        "",
        "## Model only (onnxruntime, random inputs, after warm-up)",
        "",
        "| runtime | batch | threads | p50 ms | p90 ms | p99 ms | mean ms | ms/image | images/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = record["model_only"]["model_only"] + (
        (record["model_only"].get("pytorch") or {}).get("rows") or []
    )
    for row in rows:
        lat = row["latency_ms"]
        lines.append(
            f"| {row['engine']} {row['precision']} | {row['batch_size']} | {row['threads']} | {lat['p50']:.2f} | "
            f"{lat['p90']:.2f} | {lat['p99']:.2f} | {lat['mean']:.2f} | {row['per_image_ms']['mean']:.2f} | "
            f"{row['images_per_s']:.1f} |"
        )
    speedups = record["model_only"].get("int8_speedup") or []
    if speedups:
        lines += ["", "INT8 speed-up over fp32 (mean latency): " + ", ".join(
            f"batch {s['batch_size']} / {s['threads']} threads: {s['speedup']:.2f}x" for s in speedups)]  # fmt: skip
    e2e, big = record["end_to_end"], record["peak_rss_large_folder"]
    lines += [
        "",
        "## End to end (`kidney-edge predict`, whole process, start-up included, batch 8)",
        "",
        "| run | files | wall s | images/s | first batch s | peak RSS MB | exit |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run in (("phantom 512 px JPEGs", e2e), ("large folder (hard links)", big)):
        if run:
            lines.append(
                f"| {name} | {run['rows']} | {run['wall_s']:.2f} | {run['images_per_s']:.1f} | "
                f"{run['first_batch_s']} | {run['peak_rss_mb']:.0f} | {run['exit_code']} |"
            )
    lines += ["", "## Targets (issue 7)", "", "| target | value | goal | met |", "| --- | ---: | --- | --- |"]
    for name, target in record["targets"].items():
        lines.append(
            f"| {name} | {target['value']} | {target['target']} | {'yes' if target['met'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
