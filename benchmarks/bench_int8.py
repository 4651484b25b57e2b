"""fp32 vs INT8 (QDQ, per-channel weights) for a trained run: latency and test accuracy.

    python benchmarks/bench_int8.py --run models/RUN [--out benchmarks/results/int8]

Exports RUN to fp32 ONNX (parity checked by export itself), quantizes it several ways
(activations uint8 = U8S8 kernels vs int8 = S8S8; MinMax vs Percentile vs Entropy calibration;
7-bit "reduce range" weights), scores every variant on the run's test split (macro-F1, tumor
recall, agreement with fp32, through the same gate export uses), and times fp32 and the
latency-relevant INT8 variants at batch 1 and 8 with onnxruntime. Timing rounds are
interleaved across models so that load from other jobs on a shared machine hits all of them
alike; the load average before and after is recorded. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

# (name, activation type, calibration method, reduce_range, calibration images or None for
# --calibration-images, timed?). Histogram calibrators (percentile, entropy) cost ~2 s per image on
# 2 busy cores, so they are compared with MinMax at 100 images; MinMax also runs at 300.
VARIANTS = [
    ("u8s8_minmax", "uint8", "minmax", False, None, True),
    ("s8s8_minmax", "int8", "minmax", False, None, True),
    ("u8s8_minmax_reduce_range", "uint8", "minmax", True, None, True),
    ("u8s8_minmax_100", "uint8", "minmax", False, 100, False),
    ("u8s8_percentile_100", "uint8", "percentile", False, 100, False),
    ("u8s8_entropy_100", "uint8", "entropy", False, 100, False),
]
DEFAULT_VARIANTS = "u8s8_minmax,s8s8_minmax,u8s8_minmax_reduce_range,u8s8_minmax_100,u8s8_percentile_100"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="trained run folder (best.pt + splits.csv)")
    parser.add_argument("--work", type=Path, default=Path("export/bench_int8"), help="where models go")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8")
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help=f"of: {', '.join(v[0] for v in VARIANTS)}"
    )
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", default="1,2", help="onnxruntime thread counts to time, comma-separated")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    parser.add_argument("--iterations", type=int, default=6, help="timed runs per model per round")
    return parser.parse_args()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def export_fp32(run: Path, work: Path) -> dict[str, Any]:
    from kidney_edge.export import ExportConfig, export_model

    started = time.perf_counter()
    result = export_model(run, work, ExportConfig(int8=False))
    return {"seconds": round(time.perf_counter() - started, 1), **result.parity}


def quantize_variants(
    fp32: Path, run: Path, work: Path, names: list[str], calibration_images: int
) -> dict[str, dict[str, Any]]:
    """Quantize and score each variant on the test split with the export's own gate."""
    from kidney_edge.export import select_images
    from kidney_edge.quantize import QuantizationConfig, int8_accuracy_gate, quantize_model
    from kidney_edge.runtime import OnnxClassifier

    spec = OnnxClassifier(fp32).spec
    images = select_images(run / "splits.csv", (), spec)
    results = {}
    for name, activation, method, reduce_range, n_calibration, timed in VARIANTS:
        if name not in names:
            continue
        calibration = images.calibration_paths[: n_calibration or calibration_images]
        log(f"quantize {name} on {len(calibration)} calibration images")
        config = QuantizationConfig(
            activation_type=activation, calibrate_method=method, reduce_range=reduce_range
        )
        path = work / f"model.{name}.int8.onnx"
        started = time.perf_counter()
        recipe = quantize_model(fp32, path, calibration, spec, config)
        seconds = time.perf_counter() - started
        log(f"score {name} ({seconds:.0f} s to quantize)")
        gate = int8_accuracy_gate(fp32, path, images.test_paths, images.test_labels)
        results[name] = {"path": str(path), "timed": timed, "quantize_seconds": round(seconds, 1),
                         "size_bytes": path.stat().st_size, "recipe": recipe, "gate": gate}  # fmt: skip
    return results


def time_models(models: dict[str, Path], batch_sizes: list[int], threads: list[int], rounds: int,
                iterations: int) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for count in threads:
        rows += _time_models(models, batch_sizes, count, rounds, iterations)
    return rows


def _time_models(models: dict[str, Path], batch_sizes: list[int], threads: int, rounds: int,
                 iterations: int) -> list[dict[str, Any]]:  # fmt: skip
    """Interleaved rounds: every model runs `iterations` batches per round, round after round."""
    from kidney_edge.runtime import OnnxClassifier
    from kidney_edge.runtime.benchmark import latency_stats, time_callable

    classifiers = {name: OnnxClassifier(path, threads=threads) for name, path in models.items()}
    rows = []
    for batch_size in batch_sizes:
        size = next(iter(classifiers.values())).input_size
        batch = np.random.default_rng(0).normal(size=(batch_size, 3, size, size)).astype(np.float32)
        seconds: dict[str, list[float]] = {name: [] for name in classifiers}
        for classifier in classifiers.values():
            time_callable(lambda c=classifier, b=batch: c.run(b), warmup=3, iterations=1)
        for round_index in range(rounds):
            log(f"timing batch {batch_size}, {threads} threads, round {round_index + 1}/{rounds}")
            for name, classifier in classifiers.items():
                seconds[name] += time_callable(
                    lambda c=classifier, b=batch: c.run(b), warmup=1, iterations=iterations
                )
        for name, classifier in classifiers.items():
            rows.append({"model": name, "batch_size": batch_size, "threads": classifier.threads,
                         "min_per_image_ms": round(min(seconds[name]) * 1000 / batch_size, 3),
                         **latency_stats(seconds[name], batch_size)})  # fmt: skip
    return rows


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fp32 = {(r["batch_size"], r["threads"]): r for r in rows if r["model"] == "fp32"}
    return [
        {"model": r["model"], "batch_size": r["batch_size"], "threads": r["threads"],
         "speedup_p50": round(fp32[r["batch_size"], r["threads"]]["per_image_ms"]["p50"] / r["per_image_ms"]["p50"], 2),
         "speedup_min": round(fp32[r["batch_size"], r["threads"]]["min_per_image_ms"] / r["min_per_image_ms"], 2)}
        for r in rows if r["model"] != "fp32"
    ]  # fmt: skip


def main() -> None:
    args = parse_args()
    from kidney_edge.runtime import cpu_isa, machine_info

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # PyTorch only runs the export's parity check here
    names = [n for n in args.variants.split(",") if n]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    record: dict[str, Any] = {"command": " ".join(sys.argv), "started": datetime.now(timezone.utc).isoformat(),
                              "machine_before": machine_info(), "cpu_isa": cpu_isa(), "run": str(args.run)}  # fmt: skip
    log("export fp32")
    record["export"] = export_fp32(args.run, args.work)
    fp32 = args.work / "model.onnx"
    record["variants"] = quantize_variants(fp32, args.run, args.work, names, args.calibration_images)
    timed = {"fp32": fp32, **{n: Path(v["path"]) for n, v in record["variants"].items() if v["timed"]}}
    record["load_before_timing"] = [round(x, 2) for x in os.getloadavg()]
    threads = [int(t) for t in args.threads.split(",")]
    record["latency"] = time_models(timed, batch_sizes, threads, args.rounds, args.iterations)
    record["speedup"] = speedups(record["latency"])
    record["machine_after"] = machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(render_markdown(record))
    log(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


def render_markdown(record: dict[str, Any]) -> str:
    isa, before, after = record["cpu_isa"], record["machine_before"], record["machine_after"]
    flags = (
        ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if isa.get(f))
        or "none"
    )
    lines = [
        "# INT8 vs fp32 (onnxruntime, QDQ, per-channel int8 weights)", "",
        f"Recorded by `benchmarks/bench_int8.py` ({record['started'][:19]} UTC): `{record['command']}`.", "",
        f"Machine: {isa['cpu']}, {before['cores_usable']} usable cores, ISA: {flags}"
        f" (VNNI: {'yes' if isa['vnni'] else 'no'}); onnxruntime {isa['onnxruntime']}.",
        f"Load average (1, 5, 15 min): {before['load_average_1m_5m_15m']} at start, "
        f"{record['load_before_timing']} before timing, {after['load_average_1m_5m_15m']} at the end "
        "(machine shared with other jobs: latency figures are pessimistic and noisy).", "",
        f"Run: `{record['run']}`; fp32 export parity: max |dp| {record['export']['max_abs_diff']:.1e}, "
        f"argmax agreement {record['export']['argmax_agreement']:.0%} on {record['export']['n_images']} images.", "",
        "## Accuracy on the test split (decision rule of the spec)", "",
        "| variant | activations | calibration | reduce range | macro-F1 fp32 -> INT8 | tumor recall fp32 -> INT8 "
        "| agreement with fp32 | logit rel. error | gate | size MB | quantize s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, v in record["variants"].items():
        g, r = v["gate"], v["recipe"]
        lines.append(
            f"| {name} | {r['activation_type']} | {r['calibrate_method']} | {r['reduce_range']} "
            f"| {g['fp32']['macro_f1']:.4f} -> {g['int8']['macro_f1']:.4f} ({g['delta']['macro_f1'] * 100:+.2f}) "
            f"| {_f(g['fp32']['tumor_recall'])} -> {_f(g['int8']['tumor_recall'])} "
            f"| {g['decision_agreement']:.2%} | {g['logit_relative_error']:.3f} | {'pass' if g['passed'] else 'FAIL'} "
            f"| {v['size_bytes'] / 1e6:.1f} | {v['quantize_seconds']} |"
        )
    lines += ["", f"Test images: {next(iter(record['variants'].values()))['gate']['n_images']}." if record["variants"]
              else "", "", "## Latency (onnxruntime, ms per image)", "",
              "| model | batch | threads | min | p50 | p90 | speedup vs fp32 (min) | speedup vs fp32 (p50) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    speed = {(s["model"], s["batch_size"], s["threads"]): s for s in record["speedup"]}
    for row in record["latency"]:
        up = speed.get(
            (row["model"], row["batch_size"], row["threads"]), {"speedup_min": 1.0, "speedup_p50": 1.0}
        )
        lines.append(
            f"| {row['model']} | {row['batch_size']} | {row['threads']} | {row['min_per_image_ms']:.2f} "
            f"| {row['per_image_ms']['p50']:.2f} | {row['per_image_ms']['p90']:.2f} "
            f"| {up['speedup_min']:.2f}x | {up['speedup_p50']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
