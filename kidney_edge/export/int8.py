"""The INT8 copy: quantized under a staging name, gated on test accuracy, then installed as
``model.int8.onnx`` or renamed ``model.int8.rejected.onnx`` so nothing loads it by mistake.
"""

from __future__ import annotations

import logging
import os

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
    """Quantize, gate on test accuracy, install as model.int8.onnx or rename to *.rejected.onnx."""
    from kidney_edge.quantize import int8_accuracy_gate, quantize_model, require_quantization_tools

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
    calibration_progress = None if progress is None else (lambda d, t: progress("calibration", d, t))
    try:
        recipe = quantize_model(
            result.model_path, staging, calibration, spec, config.quantization, progress=calibration_progress
        )
        if progress is not None:
            progress("int8 gate", 0, 1)
        gate = int8_accuracy_gate(
            result.model_path,
            staging,
            images.test_paths,
            images.test_labels,
            max_drop=config.quantization.max_drop,
        )
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    gate = {"recipe": recipe, **gate, "allowed_drop": config.allow_int8_drop, "cpu": cpu_isa()}
    gate["warnings"] = list(result.warnings)
    accepted = gate["passed"] or config.allow_int8_drop
    target = result.out_dir / (INT8_FILE if accepted else REJECTED_INT8_FILE)
    os.replace(staging, target)
    gate["model"] = target.name
    result.parity["int8"] = gate
    atomic_write_json(result.parity_path, result.parity)
    if accepted:
        result.int8_path = target
        if not gate["passed"]:
            result.warnings.append(
                f"INT8 failed the accuracy gate but was kept (--allow-int8-drop): "
                f"{'; '.join(gate['failures'])}"
            )
        return
    result.rejected_int8_path = target
    raise KidneyEdgeError(
        f"INT8 accuracy gate failed on {gate['n_images']} test images: {'; '.join(gate['failures'])}. "
        f"The fp32 model {result.model_path} is kept (parity passed); the INT8 graph was renamed to "
        f"{target} so nothing loads it by mistake. Figures: {result.parity_path}. Keep it anyway with "
        "--allow-int8-drop, or try another --calibration-method / --int8-activations, or export with --no-int8"
    )
