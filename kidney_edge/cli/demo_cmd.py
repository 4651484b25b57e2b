"""`kidney-edge demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from kidney_edge.cli._app import PANEL_TOOLS, app, console, library_errors, print_headline
from kidney_edge.demo import FULL, QUICK, DemoConfig

_DEMO_HELP = f"""Run the whole pipeline on built-in phantom data, offline, on the CPU.

Generates phantom kidney CT slices, splits them without leakage, trains EfficientNet-Lite0 in two \
phases, evaluates on the test split (report with CIs, calibration, Grad-CAM), exports ONNX fp32 + \
INT8 with parity, predicts {FULL.n_holdout:,} slices of new phantom patients and benchmarks latency. \
Training runs the default recipe of `train` at {FULL.image_size} px within a \
{FULL.train_budget_min:g}-minute budget, so a slower CPU trains fewer epochs rather than waiting \
longer; benchmarks/results/demo.md records the whole demo's time per stage. --quick takes 1-2 minutes.
"""


@app.command(rich_help_panel=PANEL_TOOLS, help=_DEMO_HELP)
def demo(
    out: Path = typer.Option(
        DemoConfig.out,
        "--out",
        metavar="DIR",
        help="Folder for every artifact of the demo: its phantom data, run, export and predictions "
        "stay together there, apart from your own models/ and export/.",
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help=f"A 1-2 minute smoke run: {QUICK.n_images} images at {QUICK.image_size} px, training cut to "
        f"a {QUICK.train_budget_min:g}-minute budget.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for data, split and training."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what an earlier demo left in --out."),
) -> None:
    from kidney_edge.demo import run_demo

    with library_errors():
        config = DemoConfig(out=out, quick=quick, seed=seed, overwrite=overwrite)
        result = run_demo(config, progress=lambda message: console.print(f"[cyan]>[/] {message}"))
    _render(result)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _pct_ci(value: float | None, ci: list[float] | None) -> str:
    return _pct(value) + (f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else "")


def _render(result: Any) -> None:
    print_headline(
        result.test_metrics, f"Test split ({result.headline.get('n_test')} slices of held-out patients)"
    )
    for label, verdicts in (
        ("argmax", result.targets_met),
        ("the decision rule", result.targets_met_under_rule),
    ):
        met = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in verdicts.items())
        console.print(f"targets (>= 97%) on the test split under {label}: {met}")
    phases = ", ".join(f"{name} {value:.3f}" for name, value in result.phase_val_f1.items())
    console.print(f"best validation macro-F1 per phase: {phases}")
    parity, gate = result.parity, result.parity.get("int8") or {}
    console.print(f"ONNX parity: max |dp| {parity.get('max_abs_diff'):.2e}, argmax agreement "
                  f"{_pct(parity.get('argmax_agreement'))} on {parity.get('n_images')} test images")  # fmt: skip
    if gate:
        verdict = "passed" if gate.get("passed") else "FAILED (fp32 deployed)"
        console.print(f"INT8 gate {verdict}: {gate.get('deciding', '')}")
        for decision in ("argmax", "rule"):
            fp32, int8 = gate["fp32"][decision], gate["int8"][decision]
            console.print(f"  {decision:6s} macro-F1 {_pct(fp32['macro_f1'])} -> {_pct(int8['macro_f1'])}, "
                          f"{gate['positive_class']} recall {_pct(fp32['positive_recall'])} -> {_pct(int8['positive_recall'])}")  # fmt: skip
    hold = result.holdout
    console.print(f"held-out phantom patients: {hold.get('images')} images with {hold.get('model')}, "
                  f"{hold.get('images_per_s')} images/s end to end")  # fmt: skip
    table = Table(title=f"Held-out patients: {hold.get('n')} slices (95% CI)")
    for column in ("figure", "argmax", "rule (what predict writes)"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for key, name in (("tumor_recall", "Tumor recall"), ("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        table.add_row(name, *(_pct_ci(hold[d][key], hold[d].get(f"{key}_ci")) for d in ("argmax", "rule")))
    console.print(table)
    console.print(
        f"labelled unknown by the OOD detector: {hold.get('unknown')} of {hold.get('n')} held-out slices"
    )
    foreign = result.foreign
    if foreign:
        console.print(f"foreign inputs (photos, MR, frames, text, colour): {foreign['images']} files -> {foreign['labels']}"
                      f"{', ' + str(foreign['failed']) + ' unreadable (error rows)' if foreign['failed'] else ''}")  # fmt: skip
    for decision, verdicts in hold["targets_met"].items():
        met = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in verdicts.items())
        console.print(f"targets (>= 97%) on the held-out patients under {decision}: {met}")
    for warning in result.warnings:
        console.print(f"[yellow]training warning:[/] {warning}")
    latency = Table(title="Model-only latency (onnxruntime)")
    for column in ("precision", "batch", "threads", "ms/image p50", "images/s"):
        latency.add_column(column, justify="right")
    for row in result.benchmark.get("model_only") or []:
        latency.add_row(str(row.get("precision")), str(row.get("batch_size")), str(row.get("threads")),
                        f"{row['per_image_ms']['p50']:.2f}", f"{row.get('images_per_s', 0):.0f}")  # fmt: skip
    console.print(latency)
    timing = Table(title="Wall time per stage (s)")
    for name in result.stages:
        timing.add_column(name, justify="right")
    timing.add_column("total", justify="right")
    timing.add_row(*(f"{s:.0f}" for s in result.stages.values()), f"{result.total_s:.0f}")
    console.print(timing)
    for name, path in result.artifacts.items():
        console.print(f"  {name:24s} {path}")
