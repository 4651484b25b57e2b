"""`kidney-edge export`: thin wrapper over ``kidney_edge.export.export_model``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kidney_edge.cli._app import (
    PANEL_MODEL,
    NowArgument,
    NowOption,
    Renamed,
    app,
    console,
    err_console,
    library_errors,
)
from kidney_edge.export import MIN_OPSET, ExportConfig, Exporter
from kidney_edge.int8_gate import Int8GateConfig
from kidney_edge.quantize import ActivationType, CalibrationMethod, QuantizationConfig

if TYPE_CHECKING:  # pragma: no cover
    from kidney_edge.export import ExportResult


@app.command(
    rich_help_panel=PANEL_MODEL,
    old_spellings=(
        NowOption("RUN", "--model", positionals=1),
        NowArgument("--images", "DATA"),
        Renamed("--splits", "--splits-csv"),
    ),
)
def export(
    model: Annotated[
        Path,
        typer.Option(
            "--model", metavar="PATH", help="Run folder (best.pt + splits.csv) or a .pt checkpoint."
        ),
    ],
    data: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Images or folders to check parity on and calibrate INT8 with, when the run has no "
            "splits.csv and no --splits-csv is given.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Folder to write the models and parity.json to; default: export/<run name>.",
        ),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8/--no-int8",
            help="Also write model.int8.onnx, kept only if it passes the accuracy gate against fp32.",
        ),
    ] = ExportConfig.int8,
    allow_int8_drop: Annotated[
        bool, typer.Option("--allow-int8-drop", help="Keep INT8 even if it fails the gate.")
    ] = ExportConfig.allow_int8_drop,
    require_int8: Annotated[
        bool,
        typer.Option(
            "--require-int8",
            help="Exit 1 when no INT8 passes the gate. Default: ship fp32 only and say why.",
        ),
    ] = ExportConfig.require_int8,
    max_int8_drop: Annotated[
        float,
        typer.Option(
            "--max-int8-drop",
            help="INT8 is refused when its macro-F1 or positive-recall drop on the test split exceeds "
            "this even at the low end of its bootstrap CI (0.01 = 1 point).",
        ),
    ] = Int8GateConfig.max_drop,
    int8_min_agreement: Annotated[
        float,
        typer.Option(
            "--int8-min-agreement",
            help="Share of decisions (argmax and rule) INT8 must make as fp32 does, on every image "
            "of the splits (label-free).",
        ),
    ] = Int8GateConfig.min_agreement,
    int8_gate_images: Annotated[
        int, typer.Option("--int8-gate-images", help="At most this many images for the agreement (seeded sample).")
    ] = Int8GateConfig.max_images,
    int8_repair: Annotated[
        bool,
        typer.Option(
            "--int8-repair/--no-int8-repair",
            help="When INT8 fails the gate, keep its most sensitive blocks fp32 one at a time while "
            "it stays faster than fp32 on this CPU.",
        ),
    ] = ExportConfig.int8_repair,
    splits_csv: Annotated[
        Path | None,
        typer.Option(
            "--splits-csv",
            metavar="FILE",
            help="splits.csv for parity, calibration and the gate; default: the run's.",
        ),
    ] = None,
    calibration_images: Annotated[
        int, typer.Option("--calibration-images", help="Training images that calibrate INT8.")
    ] = ExportConfig.calibration_images,
    opset: Annotated[int, typer.Option("--opset", help=f"ONNX opset (>= {MIN_OPSET}).")] = ExportConfig.opset,
    parity_batch_size: Annotated[
        int, typer.Option("--parity-batch-size", help="Batch size of the check.")
    ] = ExportConfig.parity_batch_size,
    parity_images: Annotated[
        int, typer.Option("--parity-images", help="Test images PyTorch checks.")
    ] = ExportConfig.max_parity_images,
    int8_activations: Annotated[
        ActivationType, typer.Option("--int8-activations", help="auto: uint8 on x86-64, int8 on ARM.")
    ] = QuantizationConfig.activation_type,
    calibration_method: Annotated[
        CalibrationMethod, typer.Option("--calibration-method", help="INT8 activation ranges.")
    ] = QuantizationConfig.calibrate_method,
    int8_reduce_range: Annotated[
        bool | None,
        typer.Option(
            "--int8-reduce-range/--no-int8-reduce-range", help="7-bit weights; default: x86 w/o VNNI."
        ),
    ] = None,
    exporter: Annotated[
        Exporter, typer.Option("--exporter", help="torch.onnx exporter.")
    ] = ExportConfig.exporter,
    ood: Annotated[
        bool,
        typer.Option(
            "--ood/--no-ood",
            help="Carry the run's out-of-distribution detector (fitted on its splits if it has none).",
        ),
    ] = ExportConfig.ood,
) -> None:
    """Export to ONNX with the spec inside, prove parity with PyTorch, add a gated INT8 model."""
    from kidney_edge.export import default_out_dir, export_model

    out_dir = out if out is not None else default_out_dir(model)
    with library_errors():
        config = ExportConfig(
            int8=int8, allow_int8_drop=allow_int8_drop, require_int8=require_int8, splits=splits_csv, images=tuple(data or ()),
            calibration_images=calibration_images, opset=opset, parity_batch_size=parity_batch_size,
            max_parity_images=parity_images, exporter=exporter, ood=ood, int8_repair=int8_repair,
            gate=Int8GateConfig(
                min_agreement=int8_min_agreement, max_drop=max_int8_drop, max_images=int8_gate_images
            ),
            quantization=QuantizationConfig(
                activation_type=int8_activations, calibrate_method=calibration_method,
                reduce_range=int8_reduce_range,
            ),
        )  # fmt: skip
        with console.status("exporting") as status:

            def progress(stage: str, done: int, total: int) -> None:
                status.update(f"{stage} {done}/{total}" if total > 1 else stage)

            result = export_model(model, out_dir, config=config, progress=progress)
    _render(result)


def _render(result: ExportResult) -> None:
    parity = result.parity
    console.print(
        f"[green]wrote[/] {result.model_path}  (opset {parity['opset']}, {parity['exporter']} exporter)\n"
        f"parity vs PyTorch on {parity['n_images']} test images at batch {parity['batch_size']}: "
        f"max |dp| {parity['max_abs_diff']:.1e}, argmax agreement {parity['argmax_agreement']:.0%}"
    )
    ood = parity.get("ood")
    console.print(f"unknown (fp32): {ood['description']}" if ood else "unknown: no OOD detector")
    gate = result.int8_gate
    if gate is not None:
        _render_int8(result, gate)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    model = result.int8_path or result.model_path
    both = "   # fp32 and INT8 side by side" if result.int8_path else ""
    console.print(
        f"figures: {result.parity_path}\n\nNext:\n"
        f"  kidney-edge benchmark --model {result.model_path}{both}\n"
        f"  kidney-edge predict FOLDER --model {model}\n"
        f"  kidney-edge info --model {model}"
    )


def _render_int8(result: ExportResult, gate: dict) -> None:
    recipe, speed, repair = gate["recipe"], gate.get("speed") or {}, gate.get("repair") or {}
    if result.int8_path is not None:
        console.print(
            f"[green]wrote[/] {result.int8_path}  ({recipe['activation_type']} activations"
            f"{', 7-bit weights' if recipe.get('reduce_range') else ''}; "
            f"{speed.get('speedup', float('nan')):.2f}x fp32 speed at batch {speed.get('batch_size')} on this CPU)"
        )
    console.print(gate["deciding"])  # the one figure that decided
    if repair.get("blocks_fp32") or repair.get("steps"):
        kept = ", ".join(repair["blocks_fp32"]) or "none"
        console.print(f"  repair: kept fp32 {kept} ({repair['stopped']}; {repair.get('seconds')} s)")
    if gate.get("labelled"):
        for decision in ("argmax", "rule"):
            figures = gate["labelled"][decision]["macro_f1"]
            low, high = figures["delta_ci"]
            console.print(
                f"  {decision:6s} macro-F1 {figures['fp32']:.3f} -> {figures['int8']:.3f} "
                f"(change {low * 100:+.1f} to {high * 100:+.1f} pt, {gate['labelled']['confidence']:.0%} CI)"
            )
    if gate.get("ood"):
        console.print(f"  unknown (INT8): {gate['ood']['description']}")
