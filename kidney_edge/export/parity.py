"""Parity of the ONNX graph with PyTorch on real images at another batch size, and the
staged install of ``model.onnx`` that only a graph passing it reaches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import InputError, KidneyEdgeError
from kidney_edge.export.config import ExportConfig, ExportResult, Progress
from kidney_edge.export.onnx_graph import export_onnx, onnx_module
from kidney_edge.export.selection import EvaluationImages, shuffled_paths
from kidney_edge.imaging import map_batches
from kidney_edge.io_utils import atomic_write_json
from kidney_edge.runtime import OnnxClassifier
from kidney_edge.runtime.layout import (
    INT8_FILE,
    MODEL_FILE,
    PARITY_FAILED_MODEL_FILE,
    REJECTED_INT8_FILE,
    UNVERIFIED_MODEL_FILE,
)
from kidney_edge.spec import ModelSpec

log = logging.getLogger(__name__)

# Parity thresholds: fp32 ONNX must reproduce PyTorch, not merely come close. It computes the
# same operations, so only float reassociation separates them: recorded Lite0 exports reach a
# max |dp| of 5e-6 (benchmarks/results/int8.md).
MAX_ABS_DIFF_PROBABILITIES = 1e-4
MIN_ARGMAX_AGREEMENT = 1.0


def check_parity(
    model: Any,
    spec: ModelSpec,
    onnx_path: Path,
    paths: Sequence[Path],
    *,
    batch_size: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """PyTorch vs onnxruntime on the same preprocessed images, at ``batch_size``; ``passed`` per thresholds."""
    import torch

    if not paths:
        raise InputError("parity needs at least one image")
    onnx_logits, onnx_probabilities = OnnxClassifier(onnx_path).predict_files(paths, batch_size)
    wrapper = onnx_module(model, spec.temperature)

    def run_torch(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (n, 3, S, S) float32
        with torch.no_grad():
            logits, probabilities, *_ = wrapper(torch.from_numpy(batch))
        return logits.numpy(), probabilities.numpy()

    on_batch = None if progress is None else (lambda done, total: progress("parity", done, total))
    torch_outputs = map_batches(paths, spec, batch_size, run_torch, on_batch)
    torch_logits = np.concatenate([logits for logits, _ in torch_outputs])  # (N, C)
    torch_probabilities = np.concatenate([probabilities for _, probabilities in torch_outputs])
    diff_probabilities = float(np.abs(torch_probabilities - onnx_probabilities).max())
    diff_logits = float(np.abs(torch_logits - onnx_logits).max())
    same_argmax = int((torch_logits.argmax(1) == onnx_logits.argmax(1)).sum())
    same_decision = int((spec.decide(torch_probabilities) == spec.decide(onnx_probabilities)).sum())
    n = len(paths)
    result = {
        "n_images": n,
        "batch_size": batch_size,
        "max_abs_diff": diff_probabilities,
        "max_abs_diff_logits": diff_logits,
        "argmax_agreement": same_argmax / n,
        "decision_agreement": same_decision / n,
        "thresholds": {"max_abs_diff": MAX_ABS_DIFF_PROBABILITIES, "argmax_agreement": MIN_ARGMAX_AGREEMENT},
    }
    result["passed"] = bool(
        diff_probabilities <= MAX_ABS_DIFF_PROBABILITIES
        and result["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT
    )
    return result


def export_verified(
    model: Any,
    spec: ModelSpec,
    images: EvaluationImages,
    config: ExportConfig,
    result: ExportResult,
    progress: Progress | None,
) -> None:
    """Export under a staging name, prove parity, then install as model.onnx (old INT8 files go)."""

    staging = result.out_dir / UNVERIFIED_MODEL_FILE
    if progress is not None:
        progress("export", 0, 1)
    record = result.parity
    parity_paths = shuffled_paths(images.test_paths, config.seed)[: config.max_parity_images]
    try:
        record.update(
            model=MODEL_FILE,
            **export_onnx(model, spec, staging, opset=config.opset, exporter=config.exporter),
        )
        record.update(
            check_parity(
                model, spec, staging, parity_paths, batch_size=config.parity_batch_size, progress=progress
            )
        )
    except BaseException:
        staging.unlink(missing_ok=True)  # an unverified graph must not linger beside the real ones
        raise
    if not record["passed"]:
        failed = result.out_dir / PARITY_FAILED_MODEL_FILE
        os.replace(staging, failed)
        record["model"] = failed.name
        atomic_write_json(result.parity_path, record)
        raise KidneyEdgeError(
            f"ONNX parity failed: max |p_torch - p_onnx| = {record['max_abs_diff']:.2e} (limit "
            f"{MAX_ABS_DIFF_PROBABILITIES:.0e}), argmax agreement {record['argmax_agreement']:.2%} (need 100%) "
            f"on {record['n_images']} images; nothing was installed as {MODEL_FILE}, the graph is kept "
            f"as {failed} and the figures in {result.parity_path}"
        )
    for stale in (INT8_FILE, REJECTED_INT8_FILE):  # INT8 files of an earlier export no longer match
        (result.out_dir / stale).unlink(missing_ok=True)
    os.replace(staging, result.model_path)
    atomic_write_json(result.parity_path, record)
    log.info(
        "wrote %s; parity max |dp| %.2e on %d images",
        result.model_path,
        record["max_abs_diff"],
        record["n_images"],
    )
