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

# (name, activation type, calibration method, reduce_range, timed?)
VARIANTS = [
    ("u8s8_minmax", "uint8", "minmax", False, True),
    ("s8s8_minmax", "int8", "minmax", False, True),
    ("u8s8_minmax_reduce_range", "uint8", "minmax", True, True),
    ("u8s8_percentile", "uint8", "percentile", False, False),
    ("u8s8_entropy", "uint8", "entropy", False, False),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="trained run folder (best.pt + splits.csv)")
    parser.add_argument("--work", type=Path, default=Path("export/bench_int8"), help="where models go")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8")
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads (default: usable CPUs)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--iterations", type=int, default=6, help="timed runs per model per round")
    return parser.parse_args()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def export_fp32(run: Path, work: Path) -> dict[str, Any]:
    from kidney_edge.export import export_model

    started = time.perf_counter()
    result = export_model(run, work, int8=False)
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
    calibration = images.calibration_paths[:calibration_images]
    results = {}
    for name, activation, method, reduce_range, timed in VARIANTS:
        if name not in names:
            continue
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


def time_models(models: dict[str, Path], batch_sizes: list[int], threads: int | None, rounds: int,
                iterations: int) -> list[dict[str, Any]]:  # fmt: skip
    """Interleaved rounds: every model runs `iterations` batches per round, round after round."""
    from kidney_edge.bench import latency_stats, time_callable
    from kidney_edge.runtime import OnnxClassifier

    classifiers = {name: OnnxClassifier(path, threads=threads) for name, path in models.items()}
    rows = []
    for batch_size in batch_sizes:
        size = next(iter(classifiers.values())).input_size
        batch = np.random.default_rng(0).normal(size=(batch_size, 3, size, size)).astype(np.float32)
        seconds: dict[str, list[float]] = {name: [] for name in classifiers}
        for classifier in classifiers.values():
            time_callable(lambda c=classifier, b=batch: c.run(b), warmup=3, iterations=1)
        for round_index in range(rounds):
            log(f"timing batch {batch_size}, round {round_index + 1}/{rounds}")
            for name, classifier in classifiers.items():
                seconds[name] += time_callable(
                    lambda c=classifier, b=batch: c.run(b), warmup=1, iterations=iterations
                )
        for name, classifier in classifiers.items():
            rows.append({"model": name, "batch_size": batch_size, "threads": classifier.threads,
                         **latency_stats(seconds[name], batch_size)})  # fmt: skip
    return rows


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fp32 = {r["batch_size"]: r["per_image_ms"]["p50"] for r in rows if r["model"] == "fp32"}
    return [
        {"model": r["model"], "batch_size": r["batch_size"],
         "speedup_p50": round(fp32[r["batch_size"]] / r["per_image_ms"]["p50"], 2)}
        for r in rows if r["model"] != "fp32"
    ]  # fmt: skip


def main() -> None:
    args = parse_args()
    from kidney_edge.bench import machine_info
    from kidney_edge.quantize import cpu_isa

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
    record["latency"] = time_models(timed, batch_sizes, args.threads, args.rounds, args.iterations)
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
        "| agreement with fp32 | gate | size MB | quantize s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, v in record["variants"].items():
        g, r = v["gate"], v["recipe"]
        lines.append(
            f"| {name} | {r['activation_type']} | {r['calibrate_method']} | {r['reduce_range']} "
            f"| {g['fp32']['macro_f1']:.4f} -> {g['int8']['macro_f1']:.4f} ({g['delta']['macro_f1'] * 100:+.2f}) "
            f"| {_f(g['fp32']['tumor_recall'])} -> {_f(g['int8']['tumor_recall'])} "
            f"| {g['decision_agreement']:.2%} | {'pass' if g['passed'] else 'FAIL'} "
            f"| {v['size_bytes'] / 1e6:.1f} | {v['quantize_seconds']} |"
        )
    lines += ["", f"Test images: {next(iter(record['variants'].values()))['gate']['n_images']}." if record["variants"]
              else "", "", "## Latency (onnxruntime, ms per image, p50 / p90)", "",
              "| model | batch | threads | p50 | p90 | images/s | speedup vs fp32 (p50) |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    speed = {(s["model"], s["batch_size"]): s["speedup_p50"] for s in record["speedup"]}
    for row in record["latency"]:
        lines.append(
            f"| {row['model']} | {row['batch_size']} | {row['threads']} | {row['per_image_ms']['p50']:.2f} "
            f"| {row['per_image_ms']['p90']:.2f} | {row['images_per_s']:.1f} | {speed.get((row['model'], row['batch_size']), 1.0):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
