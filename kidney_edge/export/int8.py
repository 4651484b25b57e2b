"""The INT8 copy: quantized under a staging name, judged by the evidence gate
(:mod:`kidney_edge.int8_gate`), repaired when it fails (:mod:`kidney_edge.int8_repair`), then
installed as ``model.int8.onnx`` or renamed ``model.int8.rejected.onnx`` so nothing loads it by
mistake. parity.json's ``int8`` section records the recipe, every gate figure, the repair
(blocks kept fp32, each step, the sensitivity ranking, seconds), the measured speed-up on this
CPU and the CPU kind.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from kidney_edge.errors import KidneyEdgeError
from kidney_edge.export.config import ExportConfig, ExportResult, Progress
from kidney_edge.export.selection import EvaluationImages
from kidney_edge.io_utils import atomic_write_json
from kidney_edge.quantize import MIN_CALIBRATION_IMAGES
from kidney_edge.runtime import cpu_isa
from kidney_edge.runtime.layout import (
    INT8_FILE,
    REJECTED_INT8_FILE,
    UNVERIFIED_INT8_FILE,
)
from kidney_edge.spec import ModelSpec

log = logging.getLogger(__name__)


def export_int8(
    spec: ModelSpec,
    images: EvaluationImages,
    config: ExportConfig,
    result: ExportResult,
    progress: Progress | None,
) -> None:
    """Quantize, gate, repair if needed, install as model.int8.onnx or rename to *.rejected.onnx."""
    from kidney_edge.quantize import require_quantization_tools

    require_quantization_tools()
    calibration = images.calibration_paths[: config.calibration_images]
    if len(calibration) < MIN_CALIBRATION_IMAGES:
        message = (
            f"INT8 calibrated on {len(calibration)} images (fewer than {MIN_CALIBRATION_IMAGES}): "
            "activation ranges may be noisy"
        )
        log.info(message)  # returned in result.warnings and parity.json: the caller shows it
        result.warnings.append(message)
    staging = result.out_dir / UNVERIFIED_INT8_FILE
    started = time.perf_counter()
    try:
        record = _quantize_and_judge(spec, images, calibration, config, result, staging, progress)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    record.update(allowed_drop=config.allow_int8_drop, cpu=cpu_isa(), seconds=round(time.perf_counter() - started, 1))
    record["warnings"] = list(result.warnings)
    _install(record, config, result, staging)


def _quantize_and_judge(
    spec: ModelSpec,
    images: EvaluationImages,
    calibration: list[Path],
    config: ExportConfig,
    result: ExportResult,
    staging: Path,
    progress: Progress | None,
) -> dict[str, Any]:
    """Build the recipe's INT8 file at ``staging``, judge it, repair it when it fails and the
    config allows; the gate record with ``recipe``, ``speed`` and ``repair``."""
    from kidney_edge.int8_gate import Int8Gate, gate_images
    from kidney_edge.int8_repair import measure_speedup, repair
    from kidney_edge.quantize import Int8Builder
    from kidney_edge.runtime.precision import MIN_INT8_SPEEDUP

    calibration_progress = None if progress is None else (lambda d, t: progress("calibration", d, t))
    with tempfile.TemporaryDirectory(prefix=".int8.", dir=result.out_dir) as tmp:
        work = Path(tmp)
        builder = Int8Builder(
            result.model_path, calibration, spec, config.quantization, work, progress=calibration_progress
        )
        recipe = builder.build(staging)
        if progress is not None:
            progress("int8 gate", 0, 1)
        pool = gate_images(
            images.test_paths, images.test_labels, images.unlabelled_paths, config.gate.max_images, config.gate.seed
        )
        gate = Int8Gate(result.model_path, pool, config.gate)
        record = gate(staging)
        speed = measure_speedup(result.model_path, staging, confirm_below=MIN_INT8_SPEEDUP)
        record["first"] = {"deciding": record["deciding"], "passed": record["passed"], "speedup": speed["speedup"]}
        if record["passed"] or not config.int8_repair:
            note = "not needed: the recipe passed" if record["passed"] else "off (--no-int8-repair)"
            return {"recipe": recipe, **record, "speed": speed, "repair": {"blocks_fp32": [], "stopped": note}}
        if speed["speedup"] < MIN_INT8_SPEEDUP:
            stopped = (f"not tried: the recipe's INT8 runs {speed['speedup']:.2f}x of fp32 on this CPU "
                       f"(< {MIN_INT8_SPEEDUP:.2f}x), so keeping blocks fp32 cannot make it worth running")  # fmt: skip
            return {"recipe": recipe, **record, "speed": speed, "repair": {"blocks_fp32": [], "stopped": stopped}}
        repair_started = time.perf_counter()
        outcome = repair(
            builder, gate, staging, work, min_speedup=MIN_INT8_SPEEDUP, first=(record, speed), recipe=recipe,
            progress=progress,
        )  # fmt: skip
        repaired = {"recipe": outcome.recipe, **outcome.gate, "first": record["first"], "speed": outcome.speed}
        return {**repaired, "repair": outcome.record(time.perf_counter() - repair_started)}


def _install(record: dict[str, Any], config: ExportConfig, result: ExportResult, staging: Path) -> None:
    accepted = record["passed"] or config.allow_int8_drop
    target = result.out_dir / (INT8_FILE if accepted else REJECTED_INT8_FILE)
    os.replace(staging, target)
    record["model"] = target.name
    if accepted:
        result.int8_path = target
        if not record["passed"]:
            warning = f"INT8 failed the gate but was kept (--allow-int8-drop): {'; '.join(record['failures'])}"
            result.warnings.append(warning)
            record["warnings"].append(warning)
        _write_parity(result, record)
        return
    result.rejected_int8_path = target
    reason = (
        f"{record['deciding']}. Repair: {record['repair'].get('stopped')}. The fp32 model {result.model_path} "
        f"is kept (parity passed); the INT8 graph was renamed to {target} so nothing loads it by mistake. "
        f"Figures: {result.parity_path}. Keep it anyway with --allow-int8-drop, or try another --calibration-method"
    )
    # A rejected INT8 leaves a complete fp32 export: edge machines run it, so the export succeeds
    # and says why there is no INT8, unless the caller needs INT8 (a deployment that counts on its speed).
    if not config.require_int8:
        result.warnings.append(f"no INT8 shipped: {reason}")
        record["warnings"].append(result.warnings[-1])
    _write_parity(result, record)
    if config.require_int8:
        raise KidneyEdgeError(f"{reason}, or drop --require-int8 to ship fp32 only")


def _write_parity(result: ExportResult, record: dict[str, Any]) -> None:
    result.parity["int8"] = record
    atomic_write_json(result.parity_path, result.parity)
