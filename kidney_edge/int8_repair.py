"""Repair an INT8 file that fails its gate by keeping its most harmful blocks in fp32.

Accuracy-controlled quantization (as OpenVINO NNCF's): rank the network's blocks by measured
sensitivity, then keep the worst in fp32 one block at a time until the gate passes, or until
the INT8 file is no longer faster than fp32 on this CPU (measured by the runtime's own probe,
:class:`~kidney_edge.runtime.precision.TimedProbe`), or until no block is left.

A block's **sensitivity** is what quantizing it costs at the logits: the block alone is
quantized (every other node fp32, the recipe's calibration ranges) and its logits are compared
with fp32 on calibration images (relative error, see
:func:`~kidney_edge.int8_gate.logit_relative_error`). A block's own output error would mislead:
noise injected early is amplified by everything after it (benchmarks/results/int8.md,
per-block sensitivity).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kidney_edge.int8_gate import Int8Gate, logit_relative_error
from kidney_edge.quantize import Int8Builder
from kidney_edge.runtime.precision import MAX_PROBE_BATCH as SPEED_BATCH  # predict reuses what export timed

log = logging.getLogger(__name__)

# Calibration images the sensitivity pass scores each block-alone graph on: a batch that is
# cheap to hold (~19 MB at 224 px) and ranks Lite0's blocks as the 32-image bench pass did.
SENSITIVITY_IMAGES = 32
_INDEXED = re.compile(r".+\.\d+$")


def block_of(node_name: str) -> str | None:
    """The block a node belongs to, from the module path exporters put in node names:
    ``/blocks/blocks.3/conv_pw/Conv`` -> ``blocks.3``, ``/stem/conv/Conv`` -> ``stem``. The
    first path segment that ends in an index (a module list's item), else the first segment;
    None for a node without a module path."""
    segments = [s for s in node_name.split("/")[:-1] if s]
    if not node_name.startswith("/") or not segments:
        return None
    return next((s for s in segments if _INDEXED.match(s)), segments[0])


def graph_blocks(node_names: Sequence[str], fp32_nodes: Sequence[str]) -> dict[str, list[str]]:
    """Block -> its nodes that the recipe quantizes (nodes already fp32 are left out), in graph order."""
    kept = set(fp32_nodes)
    blocks: dict[str, list[str]] = {}
    for name in node_names:
        block = block_of(name)
        if block is not None and name not in kept:
            blocks.setdefault(block, []).append(name)
    return blocks


def block_sensitivity(
    builder: Int8Builder, work: Path, images: int = SENSITIVITY_IMAGES
) -> list[dict[str, Any]]:
    """Every quantizable block quantized alone: its logit relative error vs fp32 on the first
    ``images`` calibration images, worst first."""
    from kidney_edge.imaging import preprocess_batch
    from kidney_edge.runtime import OnnxClassifier

    blocks = graph_blocks(builder.node_names, builder.base_fp32_nodes)
    batch = preprocess_batch(builder.calibration_paths[:images], builder.spec)  # (n, 3, S, S) float32
    reference = OnnxClassifier(builder.fp32_path, ood=False).run(batch)[0]
    every = [name for nodes in blocks.values() for name in nodes]
    rows = []
    path = work / "sensitivity.int8.onnx"
    for block, nodes in blocks.items():
        builder.build(path, [name for name in every if name not in set(nodes)])
        logits = OnnxClassifier(path, ood=False).run(batch)[0]
        rows.append({"block": block, "nodes": len(nodes), "logit_relative_error": logit_relative_error(reference, logits)})
    path.unlink(missing_ok=True)
    return sorted(rows, key=lambda row: -row["logit_relative_error"])


def measure_speedup(
    fp32_path: Path, int8_path: Path, probe: Any | None = None, *, confirm_below: float | None = None
) -> dict[str, Any]:
    """INT8 vs fp32 speed on this CPU at batch :data:`SPEED_BATCH`, by the runtime's probe, with
    the machine it was measured on (predict reuses it there, and probes again elsewhere)."""
    from kidney_edge.runtime import OnnxClassifier
    from kidney_edge.runtime.hardware import cpu_kind
    from kidney_edge.runtime.precision import TimedProbe, machine_key

    # Three warm-up batches: with one, repeated probes of the look-alike run's INT8 Lite0 (224 px)
    # ranged 0.98-2.73x of fp32 on a shared 2-core EPYC, with three 1.48-1.70x (measured by hand
    # on the files of benchmarks/results/int8.md's exports table, whose interleaved timing is the
    # reference). A repair decision is worth two seconds of timing.
    probe = probe or TimedProbe(warmup=3, min_batches=6, max_batches=16, budget_s=2.0)
    fp32, int8 = OnnxClassifier(fp32_path, ood=False), OnnxClassifier(int8_path, ood=False)
    results = [probe(fp32, int8, batch_size=SPEED_BATCH)]
    if confirm_below is not None and results[0].speedup < confirm_below:
        # A verdict of "too slow" stops the repair: measure again before trusting it. Load from
        # other processes only ever adds time, so each model keeps its best of both probes.
        results.append(probe(fp32, int8, batch_size=SPEED_BATCH))
    fp32_ms = min(r.fp32_ms_per_image for r in results)
    int8_ms = min(r.int8_ms_per_image for r in results)
    return {"speedup": round(fp32_ms / max(int8_ms, 1e-9), 3), "fp32_ms_per_image": fp32_ms,
            "int8_ms_per_image": int8_ms, "batch_size": SPEED_BATCH, "threads": results[0].threads,
            "probes": len(results), "cpu": cpu_kind(), "machine": machine_key(results[0].threads)}  # fmt: skip


@dataclass
class RepairOutcome:
    """What the repair loop tried and kept. ``gate`` is the last candidate's gate record."""

    gate: dict[str, Any]
    speed: dict[str, Any]
    recipe: dict[str, Any]  # of the file left at the candidate path
    blocks_fp32: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""  # why the loop ended

    def record(self, seconds: float) -> dict[str, Any]:
        return {"blocks_fp32": self.blocks_fp32, "steps": self.steps, "sensitivity": self.sensitivity,
                "stopped": self.stopped, "seconds": round(seconds, 1)}  # fmt: skip


def repair(
    builder: Int8Builder,
    gate: Int8Gate,
    candidate: Path,
    work: Path,
    *,
    min_speedup: float,
    first: tuple[dict[str, Any], dict[str, Any]],
    recipe: dict[str, Any],
    probe: Any | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> RepairOutcome:
    """Keep the most sensitive blocks fp32, one more per step, rebuilding ``candidate`` each
    time, until the gate passes, the speed-up falls below ``min_speedup`` or no block is left.
    ``first`` is (gate record, speed) of ``recipe``, the file at ``candidate`` now. ``candidate`` ends as the last
    file built; its blocks are ``blocks_fp32`` (the speed-failing step's file is rebuilt
    without its last block, so the file left is the fastest one tried that was not too slow)."""
    outcome = RepairOutcome(gate=first[0], speed=first[1], recipe=recipe)
    if progress is not None:
        progress("int8 sensitivity", 0, 1)
    outcome.sensitivity = block_sensitivity(builder, work)
    blocks = graph_blocks(builder.node_names, builder.base_fp32_nodes)
    ranked = [row["block"] for row in outcome.sensitivity]
    for step, block in enumerate(ranked, 1):
        if progress is not None:
            progress("int8 repair", step, len(ranked))
        trial = [*outcome.blocks_fp32, block]
        built = builder.build(candidate, [name for b in trial for name in blocks[b]], fp32_blocks=trial)
        speed = measure_speedup(builder.fp32_path, candidate, probe, confirm_below=min_speedup)
        record = gate(candidate)
        outcome.steps.append(_step(trial, record, speed))
        log.info("INT8 repair: %s fp32 -> %s; %.2fx", ", ".join(trial), record["deciding"], speed["speedup"])
        if speed["speedup"] < min_speedup:
            outcome.stopped = (
                f"keeping {block} in fp32 too made INT8 {speed['speedup']:.2f}x of fp32 on this CPU "
                f"(< {min_speedup:.2f}x): no faster INT8 passes the gate"
            )
            kept = outcome.blocks_fp32
            builder.build(candidate, [name for b in kept for name in blocks[b]], fp32_blocks=kept)
            return outcome
        outcome.blocks_fp32, outcome.gate, outcome.speed, outcome.recipe = trial, record, speed, built
        if record["passed"]:
            outcome.stopped = f"the gate passed with {len(trial)} block(s) in fp32"
            return outcome
    outcome.stopped = (
        "every block is in fp32 and the gate still fails" if ranked
        else "the graph's node names name no blocks to keep in fp32 (an exporter without module paths)"
    )  # fmt: skip
    return outcome


def _step(blocks: list[str], gate: dict[str, Any], speed: dict[str, Any]) -> dict[str, Any]:
    agreement = gate["agreement"]
    return {"blocks_fp32": blocks, "passed": gate["passed"], "deciding": gate["deciding"],
            "argmax_agreement": agreement["argmax"], "rule_agreement": agreement["rule"],
            "logit_relative_error": agreement["logit_relative_error"], "speedup": speed["speedup"]}  # fmt: skip
