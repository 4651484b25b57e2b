"""The INT8 recipe, measured: per-node sensitivity, then recipe variants through the export's gate.

    python benchmarks/bench_int8.py                          # the demo + three recipe-benchmark runs
    python benchmarks/bench_int8.py --models demo --variants baseline,fp32-stem
    python benchmarks/bench_int8.py --render-only            # rewrite int8.md from int8.json
    python benchmarks/bench_int8.py --exports                # export runs with the gate and repair

``--exports`` exports each run of EXPORTS (or ``--export NAME=RUN``) exactly as ``kidney-edge
export`` does (evidence gate, repair loop) and records per model: verdict and deciding figure,
blocks kept fp32, agreement with fp32, labelled deltas with their bootstrap CIs, the export's
own speed-up probe and an interleaved timing at batch 8, and the export's wall time.

For each trained model (checkpoint + its splits.csv):
1. export fp32 ONNX (``kidney_edge.export``, parity checked);
2. a sensitivity pass: onnxruntime's ``qdq_loss_debug`` compares every activation of the
   default QDQ graph with the fp32 graph on a few calibration images. Per tensor it gives the
   SQNR of that tensor's own quantization (``local``: pre- vs post-QDQ in the QDQ model) and
   the accumulated SQNR against fp32 (``vs fp32``); per weight, the weight's SQNR. The nodes
   with the lowest figures are the candidates to keep in fp32;
3. every recipe variant (calibration method, its percentile or moving average, calibration
   size and class balance, ``quant_pre_process``, per-channel and reduce-range weights, fp32
   stem / early layers / last conv) is
   quantized by ``kidney_edge.quantize.quantize_model`` and scored by the export's own gate
   (``kidney_edge.int8_gate``: agreement with fp32 on every image, macro-F1 and Tumor recall
   drops on the test split with bootstrap CIs, argmax and the spec's rule);
4. fp32 and every variant are timed at batch 8 with onnxruntime, interleaved round by round so
   load from other jobs hits all of them alike.
The recommended default is the variant that passes on every model with the highest geometric
mean speed-up over fp32. Results are kept per CPU kind (int8.json maps a CPU-kind label to
that machine's record; int8.md has a section per kind): speed and even INT8 numerics depend on
the CPU, so figures of two kinds never share a ratio. Runs are CPU-heavy: run one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import _harness as harness
import numpy as np

RESULTS = harness.RESULTS / "int8"

# name -> (checkpoint, splits.csv): the demo and the recipe benchmark's default-recipe runs of
# three families (benchmarks/bench_recipe.py writes them under its --workdir).
MODELS = {
    "demo": ("/tmp/demo-record/run/best.pt", "/tmp/demo-record/splits.csv"),
    "classic": ("/tmp/recipe/runs/classic-s0-lr1e-3-b9-e12-128/best.pt", "/tmp/recipe/classic-s0-n500-512px-splits.csv"),
    "classic-easy": ("/tmp/recipe/runs/classic-easy-s1-lr1e-3-b9-e12-128/best.pt", "/tmp/recipe/classic-easy-s1-n500-512px-splits.csv"),
    "lookalike": ("/tmp/recipe/runs/lookalike-s0-lr1e-3-b9-e12-128/best.pt", "/tmp/recipe/lookalike-s0-n500-512px-splits.csv"),
}  # fmt: skip

# The plain recipe: MinMax calibration, only the head fp32 (the sensitivity passes analyse it).
PLAIN: dict[str, Any] = {"calibrate_method": "minmax", "fp32_layers": ()}
# name -> (QuantizationConfig fields over PLAIN, calibration images, class-balanced calibration).
# Every variant changes one or two things of the plain recipe; "default" is whatever
# QuantizationConfig's defaults are at the commit that runs the benchmark.
VARIANTS: dict[str, tuple[dict[str, Any], int, bool]] = {
    "default": ({}, 300, False),
    "baseline": ({}, 300, False),
    "calib-100": ({}, 100, False),
    "calib-all": ({}, 100_000, False),
    "calib-balanced": ({}, 300, True),
    "percentile": ({"calibrate_method": "percentile"}, 300, False),
    "entropy": ({"calibrate_method": "entropy"}, 300, False),
    "no-pre-process": ({"pre_process": False}, 300, False),
    "per-tensor": ({"per_channel": False}, 300, False),
    "reduce-range": ({"reduce_range": True}, 300, False),
    "fp32-stem": ({"fp32_layers": ("stem",)}, 300, False),
    "fp32-last-conv": ({"fp32_layers": ("last-conv",)}, 300, False),
    "fp32-stem-last-conv": ({"fp32_layers": ("stem", "last-conv")}, 300, False),
    "fp32-early": ({"fp32_layers": ("early",)}, 300, False),
    "fp32-early-last-conv": ({"fp32_layers": ("early", "last-conv")}, 300, False),
    "fp32-early-percentile": ({"fp32_layers": ("early",), "calibrate_method": "percentile"}, 300, False),
    "fp32-early-entropy": ({"fp32_layers": ("early",), "calibrate_method": "entropy"}, 300, False),
    "fp32-early-calib-all": ({"fp32_layers": ("early",)}, 100_000, False),
    "fp32-early-calib-balanced": ({"fp32_layers": ("early",)}, 300, True),
    "fp32-early-no-pre-process": ({"fp32_layers": ("early",), "pre_process": False}, 300, False),
    # Percentile clips each activation's histogram tail (onnxruntime's CalibPercentile).
    "percentile-99.99": ({"calibrate_method": "percentile", "calibration_percentile": 99.99}, 300, False),
    "percentile-99.9": ({"calibrate_method": "percentile", "calibration_percentile": 99.9}, 300, False),
    "minmax-moving-average": ({"moving_average": True}, 300, False),
    "fp32-stem-entropy": ({"fp32_layers": ("stem",), "calibrate_method": "entropy"}, 300, False),
    "fp32-stem-percentile-99.99": ({"fp32_layers": ("stem",), "calibrate_method": "percentile",
                                    "calibration_percentile": 99.99}, 300, False),
    "fp32-early-entropy-calib-all": ({"fp32_layers": ("early",), "calibrate_method": "entropy"}, 100_000, False),
    "fp32-early-entropy-calib-balanced": ({"fp32_layers": ("early",), "calibrate_method": "entropy"}, 300, True),
    "fp32-early-moving-average": ({"fp32_layers": ("early",), "moving_average": True}, 300, False),
    "fp32-early-percentile-99.99": ({"fp32_layers": ("early",), "calibrate_method": "percentile",
                                     "calibration_percentile": 99.99}, 300, False),
}  # fmt: skip
# name -> run folder (best.pt + splits.csv) for --exports: the demo's, a near-chance run, the
# look-alike renderer's and the DICOM series phantom's (docs/export-and-int8.md says how each was made).
EXPORTS = {
    "demo": "/tmp/int8-work/demo-full/run",
    "demo-quick": "/tmp/int8-work/demo/run",
    "near-chance": "/tmp/int8-work/runs/nearchance",
    "lookalike-224": "/tmp/int8-work/runs/lookalike",
    "dicom-series": "/tmp/int8-work/runs/dicom",
}
SENSITIVITY_IMAGES = 16
BLOCK_CALIBRATION_IMAGES, BLOCK_EVAL_IMAGES = 64, 32
# Above this SQNR a tensor is exact to float precision: 8-bit pixels normalised by (v - m) / s
# quantize losslessly (~350 dB).
EXACT_DB = 100.0
SHOWN_NODES = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"of: {', '.join(MODELS)}")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT,SPLITS",
                        help="another trained model (repeatable)")  # fmt: skip
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-int8"), help="where models go")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    parser.add_argument("--iterations", type=int, default=5, help="timed batches per model per round")
    parser.add_argument("--no-sensitivity", action="store_true")
    parser.add_argument(
        "--speed-model", type=Path, help="an fp32 model.onnx timed with every variant (no gate)"
    )
    parser.add_argument("--speed-images", type=Path, help="calibration images of --speed-model")
    parser.add_argument("--note", default="")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--exports", action="store_true", help="export EXPORTS with the gate and repair")
    parser.add_argument("--export", action="append", default=[], metavar="NAME=RUN",
                        help="with --exports: these runs instead (repeatable)")  # fmt: skip
    return parser.parse_args()


# --------------------------------------------------------------------------- inputs


def variant_config(name: str) -> Any:
    """The QuantizationConfig of a variant: the plain recipe with the variant's changes, or the
    committed defaults for "default"."""
    from kidney_edge.quantize import QuantizationConfig

    fields = VARIANTS[name][0]
    return QuantizationConfig(**fields) if name == "default" else QuantizationConfig(**{**PLAIN, **fields})


def calibration_set(splits: Path, spec: Any, n: int, balanced: bool) -> list[Path]:
    """The export's calibration images (the shuffled train split, first ``n``), or ``n`` drawn
    round-robin over the classes (each shuffled) when ``balanced``."""
    from kidney_edge.dataset import read_splits
    from kidney_edge.export import select_images

    if not balanced:
        return select_images(splits, (), spec).calibration_paths[:n]
    by_class: dict[str, list[Path]] = defaultdict(list)
    for row in read_splits(splits):
        if row.split == "train":
            by_class[row.label].append(row.path)
    rng = random.Random(0)
    queues = [rng.sample(paths, len(paths)) for _, paths in sorted(by_class.items())]
    chosen: list[Path] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    return chosen


def export_fp32(name: str, checkpoint: Path, splits: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    from kidney_edge.export import ExportConfig, export_model

    out = work / name
    if not (out / "model.onnx").is_file():
        harness.log(f"{name}: export fp32")
        export_model(checkpoint, out, ExportConfig(int8=False, splits=splits))
    parity = json.loads((out / "parity.json").read_text())
    return out / "model.onnx", {
        k: parity.get(k) for k in ("max_abs_diff", "argmax_agreement", "n_images", "onnx_nodes")
    }


# --------------------------------------------------------------------------- sensitivity


def sensitivity(fp32: Path, calibration: list[Path], spec: Any, work: Path) -> dict[str, Any]:
    """Per-node fp32-vs-QDQ comparison of the default recipe on a few calibration images.

    Both graphs are run with every intermediate tensor as an output (onnxruntime's
    ``qdq_loss_debug`` helpers). Per tensor of the fp32 graph: ``vs_fp32``, the SQNR of the QDQ
    graph's dequantized tensor against fp32 (the error accumulated up to there), and ``local``,
    the SQNR of the tensor's own quantize-dequantize step inside the QDQ graph (only where the
    QDQ graph computes that tensor with the same op: the quantizer folds each ReLU6 Clip into
    its Conv's quantization range, so there the pre-QDQ tensor is the unclipped Conv output).
    Per node, ``drop``: its worst input's ``vs_fp32`` minus its output's, the damage done there
    (a Conv and the Clip it was merged into count as one node, the Clip).
    Per weight, the SQNR of its int8 copy.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_weight_error,
        create_weight_matching,
        modify_model_output_intermediate_tensors,
    )

    from kidney_edge.quantize import (
        Fp32Layer,
        QuantizationConfig,
        calibration_reader,
        layer_node_names,
        prepare_for_quantization,
        quantize_model,
    )

    config = QuantizationConfig(**PLAIN)
    prepared, qdq = work / "sensitivity.prepared.onnx", work / "sensitivity.qdq.onnx"
    work.mkdir(parents=True, exist_ok=True)
    prepare_for_quantization(fp32, prepared, config)
    quantize_model(fp32, qdq, calibration, spec, config)
    images = calibration[:SENSITIVITY_IMAGES]
    acts = {}
    for kind, path in (("float", prepared), ("qdq", qdq)):
        augmented = work / f"sensitivity.{kind}.augmented.onnx"
        modify_model_output_intermediate_tensors(str(path), str(augmented))
        collected = collect_activations(str(augmented), calibration_reader(images, spec, 8, None))
        acts[kind] = {name: np.concatenate([a.ravel() for a in arrays]) for name, arrays in collected.items()}
    float_model, qdq_model = onnx.load(str(prepared)), onnx.load(str(qdq))
    float_op = {out: node.op_type for node in float_model.graph.node for out in node.output}
    qdq_op = {out: node.op_type for node in qdq_model.graph.node for out in node.output}

    def dequantized(tensor: str) -> np.ndarray | None:
        return acts["qdq"].get(f"{tensor}_DequantizeLinear_Output", acts["qdq"].get(tensor))

    vs_fp32 = {}
    for tensor, reference in acts["float"].items():
        approximation = dequantized(tensor)
        if approximation is not None and approximation.shape == reference.shape:
            vs_fp32[tensor] = _sqnr_db(reference, approximation)
    named = {layer.value: layer_node_names(float_model, [layer])[0] for layer in Fp32Layer}
    producer = {out: node for node in float_model.graph.node for out in node.output}

    def measured_inputs(tensor: str) -> list[float]:
        """vs_fp32 of ``tensor``, or of the nearest measured tensors upstream of it (a Conv's
        output that the quantizer merged into its Clip is not measured on its own)."""
        if tensor in vs_fp32:
            return [vs_fp32[tensor]]
        node = producer.get(tensor)
        return [value for name in node.input for value in measured_inputs(name)] if node else []

    nodes = []
    for position, node in enumerate(float_model.graph.node):
        output = node.output[0]
        if output not in vs_fp32:
            continue
        inputs = [value for name in node.input for value in measured_inputs(name)]
        pre, post = acts["qdq"].get(output), acts["qdq"].get(f"{output}_DequantizeLinear_Output")
        local = None
        if pre is not None and post is not None and qdq_op.get(output) == float_op.get(output):
            local = _sqnr_db(pre, post)
        nodes.append({
            "node": node.name, "op": node.op_type, "position": position, "tensor": output,
            "vs_fp32_sqnr_db": vs_fp32[output], "local_sqnr_db": local,
            "input_vs_fp32_sqnr_db": min(inputs) if inputs else None,
            "drop_db": round(min(inputs) - vs_fp32[output], 2) if inputs else None,
        })  # fmt: skip
    consumers = defaultdict(list)
    for node in float_model.graph.node:
        for name in node.input:
            consumers[name].append(node.name)
    weights = compute_weight_error(create_weight_matching(str(prepared), str(qdq)))
    weight_rows = [{"weight": w, "node": (consumers.get(w) or ["?"])[0], "sqnr_db": round(float(v), 2)}
                   for w, v in weights.items()]  # fmt: skip
    return {
        "images": len(images),
        "layers": named,
        "input_vs_fp32_sqnr_db": vs_fp32.get("input"),
        "logits_vs_fp32_sqnr_db": vs_fp32.get("logits"),
        "nodes": nodes,
        "weights": sorted(weight_rows, key=lambda row: row["sqnr_db"]),
    }


def block_sensitivity(fp32: Path, calibration: list[Path], spec: Any, work: Path) -> list[dict[str, Any]]:
    """Each block quantized alone under the plain recipe (every other node fp32): its logit
    relative error vs fp32 on calibration images. The library's measurement
    (``kidney_edge.int8_repair.block_sensitivity``, which the export's repair loop ranks by)."""
    from kidney_edge.int8_repair import block_sensitivity as measured_sensitivity
    from kidney_edge.quantize import Int8Builder, QuantizationConfig

    builder = Int8Builder(fp32, calibration[:BLOCK_CALIBRATION_IMAGES], spec, QuantizationConfig(**PLAIN), work)
    return measured_sensitivity(builder, work, BLOCK_EVAL_IMAGES)


def _sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - approximation) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return round(10 * math.log10(max(signal, 1e-30) / max(noise, 1e-30)), 2)


# --------------------------------------------------------------------------- variants and timing


def run_variant(name: str, fp32: Path, splits: Path, spec: Any, images: Any, work: Path) -> dict[str, Any]:
    from kidney_edge.int8_gate import Int8Gate, Int8GateConfig, gate_images
    from kidney_edge.quantize import quantize_model

    _, n_calibration, balanced = VARIANTS[name]
    calibration = calibration_set(splits, spec, n_calibration, balanced)
    config = variant_config(name)
    path = work / f"model.{name}.int8.onnx"
    harness.log(f"  {name}: quantize on {len(calibration)} images")
    started = time.perf_counter()
    recipe = quantize_model(fp32, path, calibration, spec, config)
    seconds = time.perf_counter() - started
    pool = gate_images(images.test_paths, images.test_labels, images.unlabelled_paths, 2000, 0)
    gate = Int8Gate(fp32, pool, Int8GateConfig())(path)
    harness.log(f"  {name}: gate {'pass' if gate['passed'] else 'FAIL'} ({seconds:.0f} s to quantize)")
    return {"path": str(path), "balanced_calibration": balanced, "quantize_seconds": round(seconds, 1),
            "size_bytes": path.stat().st_size, "recipe": recipe, "gate": gate}  # fmt: skip


def time_models(models: dict[str, Path], batch_size: int, threads: int, rounds: int, iterations: int) -> dict:
    """Per-image ms of each model at ``batch_size``: rounds in which every model runs
    ``iterations`` batches, in a new random order each round; a model's figure is its best
    round's median (load from other jobs only ever adds time), the median round is kept too."""
    from kidney_edge.runtime import OnnxClassifier

    classifiers = {name: OnnxClassifier(path, threads=threads, ood=False) for name, path in models.items()}
    size = next(iter(classifiers.values())).input_size
    batch = np.random.default_rng(0).normal(size=(batch_size, 3, size, size)).astype(np.float32)
    for classifier in classifiers.values():
        for _ in range(2):
            classifier.run(batch)
    per_round: dict[str, list[float]] = {name: [] for name in classifiers}
    order, rng = list(classifiers), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            classifier = classifiers[name]
            times = []
            for _ in range(iterations):
                start = time.perf_counter()
                classifier.run(batch)
                times.append(time.perf_counter() - start)
            per_round[name].append(statistics.median(times) * 1000 / batch_size)
    fp32 = min(per_round["fp32"])
    return {
        name: {"ms_per_image": round(min(values), 3), "median_round_ms_per_image": round(statistics.median(values), 3),
               "speedup": round(fp32 / min(values), 3)}
        for name, values in per_round.items()
    }  # fmt: skip


def bench_speed_model(model: Path, images: Path, variants: list[str], args: argparse.Namespace) -> dict:
    """Every variant's speed on ``model`` (e.g. Lite0 at 224 px, the deployed size): no gate."""
    from kidney_edge.quantize import quantize_model
    from kidney_edge.runtime import OnnxClassifier, scan_images

    spec = OnnxClassifier(model, ood=False).spec
    calibration = scan_images(images)[:300]
    work = args.work / "speed-model"
    work.mkdir(parents=True, exist_ok=True)
    timed = {"fp32": model}
    for variant in variants:
        harness.log(f"speed model: quantize {variant}")
        timed[variant] = work / f"model.{variant}.int8.onnx"
        quantize_model(model, timed[variant], calibration, spec, variant_config(variant))
    harness.log("speed model: timing")
    load = harness.load_average()
    latency = time_models(timed, args.batch_size, args.threads, args.rounds, args.iterations)
    return {"model": str(model), "input_size": spec.input_size, "load_average_before": load, "latency": latency,
            "threads": args.threads, "batch_size": args.batch_size}  # fmt: skip


def bench_model(
    name: str, checkpoint: Path, splits: Path, variants: list[str], args: argparse.Namespace
) -> dict:
    from kidney_edge.export import select_images
    from kidney_edge.runtime import OnnxClassifier

    work = args.work / name
    fp32, parity = export_fp32(name, checkpoint, splits, args.work)
    spec = OnnxClassifier(fp32, ood=False).spec
    images = select_images(splits, (), spec)
    record: dict[str, Any] = {"checkpoint": str(checkpoint), "splits": str(splits), "input_size": spec.input_size,
                              "test_images": len(images.test_paths), "train_images": len(images.calibration_paths),
                              "parity": parity}  # fmt: skip
    if not args.no_sensitivity:
        harness.log(f"{name}: sensitivity pass")
        record["sensitivity"] = sensitivity(fp32, images.calibration_paths[:300], spec, work)
        harness.log(f"{name}: per-block sensitivity")
        record["sensitivity"]["blocks"] = block_sensitivity(fp32, images.calibration_paths, spec, work)
    record["variants"] = {}
    for variant in variants:
        record["variants"][variant] = run_variant(variant, fp32, splits, spec, images, work)
    harness.log(f"{name}: timing")
    record["load_average_before"] = harness.load_average()
    timed = {"fp32": fp32, **{v: Path(r["path"]) for v, r in record["variants"].items()}}
    record["latency"] = time_models(timed, args.batch_size, args.threads, args.rounds, args.iterations)
    record["threads"], record["batch_size"] = args.threads, args.batch_size
    return record


# --------------------------------------------------------------------------- exports with the gate and repair


def bench_export(name: str, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``kidney-edge export RUN`` with its defaults (evidence gate, repair), then fp32 vs the INT8
    file it left (installed or rejected) timed interleaved at ``--batch-size``."""
    import shutil

    from kidney_edge.errors import KidneyEdgeError
    from kidney_edge.export import ExportConfig, export_model

    out = args.work / "exports" / name
    shutil.rmtree(out, ignore_errors=True)
    harness.log(f"{name}: export {run}")
    started, error = time.perf_counter(), None
    try:
        export_model(run, out, ExportConfig())
    except KidneyEdgeError as exc:  # a rejection: parity.json says why
        error = str(exc)
    seconds = time.perf_counter() - started
    parity = json.loads((out / "parity.json").read_text())
    gate = parity["int8"]
    harness.log(f"{name}: {gate['deciding']} ({seconds:.0f} s)")
    load = harness.load_average()
    latency = time_models({"fp32": out / "model.onnx", "int8": out / gate["model"]}, args.batch_size,
                          args.threads, args.rounds, args.iterations)  # fmt: skip
    labelled = gate.get("labelled") or {}
    return {"run": str(run), "images": parity.get("images"), "export_seconds": round(seconds, 1),
            "int8_seconds": gate.get("seconds"), "error": error, "model": gate["model"], "passed": gate["passed"],
            "deciding": gate["deciding"], "failures": gate["failures"], "first": gate.get("first"),
            "recipe": {k: v for k, v in gate["recipe"].items() if k != "fp32_nodes"},
            "repair": gate.get("repair"), "agreement": gate["agreement"], "labelled": labelled,
            "export_probe": gate.get("speed"), "load_average_before_timing": load, "latency": latency,
            "threads": args.threads, "batch_size": args.batch_size}  # fmt: skip


def measure_exports(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # PyTorch only runs the export's parity check here
    runs = dict(item.partition("=")[::2] for item in args.export) if args.export else EXPORTS
    record = harness.start_record(note=args.note, exports={})
    for name, run in runs.items():
        record["exports"][name] = bench_export(name, Path(run), args)
    return harness.finish_record(record)


def _ci(figures: dict[str, Any] | None) -> str:
    if not figures or figures.get("delta") is None:
        return "n/a"
    low, high = figures["delta_ci"]
    return f"{figures['delta'] * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]"


def _render_exports(record: dict[str, Any]) -> list[str]:
    machine = harness.recorded(record, "machine")
    lines = [
        "### Exports with the evidence gate and the repair loop",
        "",
        f"Command: `{record['command']}` ({harness.recorded(record, 'started_utc')[:19]} UTC, commit "
        f"{record.get('commit', '?')}). Machine: {harness.cpu_kind(machine)}; onnxruntime {machine['onnxruntime']}. "
        f"Load average {harness.recorded_load(record, 'before')} at start, {harness.recorded_load(record, 'after')} "
        "at the end (shared machine).",
        "",
        f"Notes: {record.get('note') or '-'}",
        "",
        "Deltas are INT8 - fp32 in points on the test split with their 95% paired-bootstrap interval; agreement "
        "is on every distinct image of the splits (label-free). Speed-up: fp32 ms / INT8 ms at batch "
        "8, by the export's own probe and by this script's interleaved timing (best of rounds).",
        "",
        "| model | verdict | blocks kept fp32 | agreement argmax / rule (images) | max / mean abs dp "
        "| macro-F1 rule | macro-F1 argmax | Tumor recall rule | speed-up (export probe) | speed-up (timed) "
        "| fp32 / INT8 ms per image | export s (INT8 s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | ---: | ---: | --- | --- |",
    ]
    for name, model in record["exports"].items():
        agreement, labelled, repair = model["agreement"], model["labelled"] or {}, model["repair"] or {}
        rule, argmax = labelled.get("rule") or {}, labelled.get("argmax") or {}
        timed = model["latency"]
        verdict = "pass" if model["passed"] else "rejected"
        lines.append(
            f"| {name} | {verdict} | {', '.join(repair.get('blocks_fp32') or []) or '-'} "
            f"| {agreement['argmax']:.2%} / {agreement['rule']:.2%} ({agreement['n_images']}) "
            f"| {agreement['max_abs_diff_probabilities']:.3f} / {agreement['mean_abs_diff_probabilities']:.4f} "
            f"| {_ci(rule.get('macro_f1'))} | {_ci(argmax.get('macro_f1'))} | {_ci(rule.get('positive_recall'))} "
            f"| {model['export_probe']['speedup']:.2f}x | {timed['int8']['speedup']:.2f}x "
            f"| {timed['fp32']['ms_per_image']:.2f} / {timed['int8']['ms_per_image']:.2f} "
            f"| {model['export_seconds']:.0f} ({model['int8_seconds']:.0f}) |"
        )
    lines += ["", "Per model: the deciding figure, the recipe as first built, and what the repair did.", ""]
    for name, model in record["exports"].items():
        repair, first = model["repair"] or {}, model.get("first") or {}
        spent = "" if repair.get("seconds") is None else f" ({repair['seconds']} s)"
        tested = (model["labelled"] or {}).get("n_images", 0)
        lines.append(
            f"- **{name}** (`{model['run']}`; {tested} test images): {model['deciding']}. Recipe as built: "
            f"{first.get('deciding', '-')}, {first.get('speedup', float('nan')):.2f}x. "
            f"Repair: {repair.get('stopped', '-')}{spent}."
        )
    return lines


# --------------------------------------------------------------------------- selection and rendering


def select(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Variants measured on every model, by the number of models whose gate they pass, then by
    geometric-mean speed-up."""
    models = record["models"]
    names = set.intersection(*(set(m["variants"]) for m in models.values())) if models else set()
    rows = []
    for name in names:
        failed = sorted(model for model, m in models.items() if not m["variants"][name]["gate"]["passed"])
        speedups = [m["latency"][name]["speedup"] for m in models.values()]
        speed_model = (record.get("speed_model") or {}).get("latency", {}).get(name, {})
        rows.append({"variant": name, "passes_everywhere": not failed, "failed_on": failed,
                     "geomean_speedup": round(math.exp(statistics.mean(math.log(s) for s in speedups)), 3),
                     "speed_model_speedup": speed_model.get("speedup")})  # fmt: skip
    return sorted(rows, key=lambda r: (len(r["failed_on"]), -r["geomean_speedup"]))


def load_results(path: Path) -> dict[str, Any]:
    data = harness.read_results(path)
    if data is None:
        return {}
    if "machines" in data:
        return data["machines"]
    return {harness.cpu_kind(harness.recorded(data, "machine")): {"legacy": True, **data}}


def render(machines: dict[str, Any], legacy_md: str | None) -> str:
    lines = ["# INT8 (onnxruntime QDQ) vs fp32: recipe, accuracy gate and speed per CPU kind", "",
             "Recorded by `benchmarks/bench_int8.py`. One section per CPU kind: speed and INT8 numerics "
             "depend on the CPU, so no ratio mixes two kinds."]  # fmt: skip
    for kind, record in machines.items():
        lines += ["", f"## {kind}", ""]
        if "models" not in record and record.get("exports"):
            lines += _render_exports(record["exports"])
            continue
        if record.get("legacy"):
            # its own headings one level down, under this CPU kind's
            legacy = (
                re.sub(r"^## ", "### ", legacy_md.strip(), flags=re.M) if legacy_md else "(earlier script)"
            )
            lines += [legacy]
        else:
            lines += _render_record(record)
        if record.get("exports"):
            lines += ["", *_render_exports(record["exports"])]
    return "\n".join(lines) + "\n"


def _pt(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.2f}"


def _render_record(record: dict[str, Any]) -> list[str]:
    machine = harness.recorded(record, "machine")
    isa = ", ".join(f for f, present in machine["isa_flags"].items() if present)
    lines = [
        f"Command: `{record['command']}` ({harness.recorded(record, 'started_utc')[:19]} UTC, commit {record.get('commit', '?')}).",
        f"Machine: {machine['cpu_model']}, {machine['cores_usable']} usable cores, ISA {isa}; onnxruntime "
        f"{machine['onnxruntime']}. Load average {harness.recorded_load(record, 'before')} at start, "
        f"{harness.recorded_load(record, 'after')} at the end (shared machine).",
        "",
        f"Notes: {record.get('note') or '-'}",
        "",
        "### Selection: variants measured on every model",
        "",
        "| variant | fails the gate on | geometric-mean speed-up vs fp32 (batch 8) | speed-up on the speed model |",
        "| --- | --- | ---: | ---: |",
    ]
    for row in select(record):
        deployed = "n/a" if row.get("speed_model_speedup") is None else f"{row['speed_model_speedup']:.2f}x"
        lines.append(
            f"| {row['variant']} | {', '.join(row['failed_on']) or '-'} | {row['geomean_speedup']:.2f}x | {deployed} |"
        )
    speed = record.get("speed_model")
    if speed:
        lines += ["", f"Speed model: `{speed['model']}` ({speed['input_size']} px; batch {speed['batch_size']}, "
                  f"{speed['threads']} threads, load {harness.recorded_load(speed, 'before')} before timing): fp32 "
                  f"{speed['latency']['fp32']['ms_per_image']:.2f} ms/image."]  # fmt: skip
    for name, model in record["models"].items():
        lines += _render_model(name, model)
    return lines


def _render_model(name: str, model: dict[str, Any]) -> list[str]:
    lines = ["", f"### {name}: `{model['checkpoint']}` ({model['input_size']} px)", "",
             f"Splits `{model['splits']}`: {model['test_images']} test images (the gate), "
             f"{model['train_images']} train images (calibration). fp32 parity max |dp| "
             f"{model['parity']['max_abs_diff']:.1e}. Timing: batch {model['batch_size']}, {model['threads']} threads, "
             f"load {harness.recorded_load(model, 'before')} before it.", "",
             "| variant | gate | macro-F1 fp32 -> INT8 (pt, rule) | Tumor recall (pt, rule) | macro-F1 (pt, argmax) "
             "| agreement with fp32 | logit rel. error | fp32 nodes | ms/image | speed-up |",
             "| --- | --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
    fp32 = model["latency"]["fp32"]
    lines.append(f"| fp32 | | | | | | | | {fp32['ms_per_image']:.2f} | 1.00x |")
    for variant, result in model["variants"].items():
        gate, recipe, timing = result["gate"], result["recipe"], model["latency"][variant]
        rule, argmax = gate["delta"]["rule"], gate["delta"]["argmax"]
        lines.append(
            f"| {variant} | {'pass' if gate['passed'] else 'FAIL'} "
            f"| {gate['fp32']['rule']['macro_f1']:.3f} -> {gate['int8']['rule']['macro_f1']:.3f} ({_pt(rule['macro_f1'])}) "
            f"| {_pt(rule['positive_recall'])} | {_pt(argmax['macro_f1'])} | {gate['decision_agreement']:.1%} "
            f"| {gate['logit_relative_error']:.3f} | {len(recipe['fp32_nodes'])} | {timing['ms_per_image']:.2f} "
            f"| {timing['speedup']:.2f}x |"
        )
    judged = {v: r["gate"] for v, r in model["variants"].items() if "agreement" in r["gate"]}
    if judged:  # records of the evidence gate: agreement per decision and the deciding figure
        lines += ["", "Agreement with fp32 per decision, on every image of the splits, and the gate's deciding figure:", ""]
        for variant, gate in judged.items():
            agreement = gate["agreement"]
            lines.append(f"- **{variant}**: argmax {agreement['argmax']:.2%}, rule {agreement['rule']:.2%} "
                         f"({agreement['n_images']} images); {gate['deciding']}.")  # fmt: skip
    sens = model.get("sensitivity")
    if sens:
        lines += _render_sensitivity(sens)
    return lines


def _render_sensitivity(sens: dict[str, Any]) -> list[str]:
    layers = {node: layer for layer, node in sens["layers"].items()}

    def tag(node: str) -> str:
        return f" **{layers[node]}**" if node in layers else ""

    def worst(key: str, reverse: bool) -> list[dict[str, Any]]:
        rows = [n for n in sens["nodes"] if n[key] is not None]
        return sorted(rows, key=lambda n: n[key], reverse=reverse)[:SHOWN_NODES]

    lines = [
        "",
        f"Sensitivity of the plain recipe (MinMax, only the head fp32; {sens['images']} calibration images; SQNR in dB, "
        f"higher is better): logits {sens['logits_vs_fp32_sqnr_db']} dB vs fp32; the input quantizes "
        f"exactly ({sens['input_vs_fp32_sqnr_db']} dB: 8-bit pixels). Stem = `{sens['layers']['stem']}`, "
        f"last conv = `{sens['layers']['last-conv']}`.",
        "",
        "| largest loss at one node (worst input -> output, SQNR vs fp32) | op | input dB | output dB |",
        "| --- | --- | ---: | ---: |",
    ]
    for row in worst("drop_db", reverse=True):
        before = row["input_vs_fp32_sqnr_db"]
        shown = "exact" if before > EXACT_DB else before
        lines.append(
            f"| `{row['node']}`{tag(row['node'])} | {row['op']} | {shown} | {row['vs_fp32_sqnr_db']} |"
        )
    lines += ["", "| lowest local SQNR (its own quantize-dequantize) | op | dB |", "| --- | --- | ---: |"]
    for row in worst("local_sqnr_db", reverse=False):
        lines.append(f"| `{row['node']}`{tag(row['node'])} | {row['op']} | {row['local_sqnr_db']} |")
    if sens.get("blocks"):
        lines += ["", f"Each block quantized alone, every other node fp32 ({BLOCK_CALIBRATION_IMAGES} calibration "
                  f"images, logits on {BLOCK_EVAL_IMAGES} of them): what quantizing it costs at the logits.", "",
                  "| block | logits SQNR dB | logit rel. error |", "| --- | ---: | ---: |"]  # fmt: skip
        for row in sens["blocks"]:
            lines.append(f"| {row['block']} | {row.get('logits_sqnr_db', 'n/a')} | {row['logit_relative_error']:.4g} |")
    lines += ["", "| lowest weight SQNR | node | dB |", "| --- | --- | ---: |"]
    for row in sens["weights"][:5]:
        lines.append(f"| `{row['weight']}` | `{row['node']}`{tag(row['node'])} | {row['sqnr_db']} |")
    return lines


# --------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    machines = load_results(json_path)
    legacy_md = _legacy_markdown(md_path)
    if args.render_only:
        harness.write_markdown(args.out, render(machines, legacy_md))
    elif args.exports:
        exports = measure_exports(args)
        kind = harness.cpu_kind(exports["machine"])
        machines[kind] = {**machines.get(kind, {}), "exports": exports}  # beside that kind's variant record
        harness.write_results(args.out, {"machines": machines}, render(machines, legacy_md))
    else:
        record = measure(args)
        kind = harness.cpu_kind(record["machine"])
        exports = machines.get(kind, {}).get("exports")  # --exports' record stays beside the variants
        machines[kind] = {**record, "exports": exports} if exports else record
        harness.write_results(args.out, {"machines": machines}, render(machines, legacy_md))
    harness.log(f"wrote {md_path}" if args.render_only else f"wrote {json_path} and {md_path}")


def _legacy_markdown(md_path: Path) -> str | None:
    """The legacy machine's section as it was written (its JSON lacks the hand-written notes)."""
    if not md_path.is_file():
        return None
    text = md_path.read_text()
    if text.startswith("# INT8 vs fp32"):  # the earlier script's single-machine file
        return text.split("\n", 1)[1]
    marker = "(AVX2, no VNNI"
    sections = text.split("\n## ")
    return next((s.split("\n", 1)[1] for s in sections if marker in s.split("\n", 1)[0]), None)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # PyTorch only runs the export's parity check here
    models = {name: MODELS[name] for name in args.models.split(",") if name}
    for item in args.model:
        name, _, paths = item.partition("=")
        models[name] = tuple(paths.split(","))
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; of: {', '.join(VARIANTS)}")
    record = harness.start_record(note=args.note, models={})
    for name, (checkpoint, splits) in models.items():
        harness.log(f"{name}: {checkpoint}")
        record["models"][name] = bench_model(name, Path(checkpoint), Path(splits), variants, args)
    if args.speed_model:
        record["speed_model"] = bench_speed_model(args.speed_model, args.speed_images, variants, args)
    harness.finish_record(record)
    record["selection"] = select(record)
    return record


if __name__ == "__main__":
    main()
