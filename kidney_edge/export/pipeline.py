"""``export_model``: the export from run folder to verified ONNX files, each step in its own module."""

from __future__ import annotations

import os
from pathlib import Path

from kidney_edge.export.config import ExportConfig, ExportResult, Progress
from kidney_edge.export.int8 import export_int8
from kidney_edge.export.onnx_graph import load_checked_model
from kidney_edge.export.ood_graph import file_detector, install_ood, run_detector
from kidney_edge.export.parity import export_verified
from kidney_edge.export.selection import resolve_source, select_images
from kidney_edge.io_utils import atomic_write_json
from kidney_edge.runtime.layout import (
    MODEL_FILE,
    PARITY_FILE,
)


def export_model(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: ExportConfig | None = None,
    *,
    progress: Progress | None = None,
) -> ExportResult:
    """Export RUN (best.pt + splits.csv) or a checkpoint to ``out_dir`` under ``config`` (default:
    :class:`ExportConfig`'s defaults); see :mod:`kidney_edge.export`.

    Raises KidneyEdgeError when parity fails, or when INT8 fails the accuracy gate without
    ``allow_int8_drop`` (``model.onnx`` is then kept, parity.json says why).
    """
    config = config or ExportConfig()
    checkpoint, run_splits = resolve_source(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, spec = load_checked_model(checkpoint)
    images = select_images(config.splits or run_splits, config.images, spec, config.seed)
    result = ExportResult(out_dir, out_dir / MODEL_FILE, out_dir / PARITY_FILE, spec, {})
    result.parity = {"source": str(source), "checkpoint": str(checkpoint), "images": images.origin}
    result.warnings.extend(images.warnings)
    export_verified(model, spec, images, config, result, progress)
    splits = images.splits  # the run's splits.csv as select_images read it: the OOD fit's data too
    detector = None
    if config.ood:
        detector = file_detector(result.model_path, run_detector(checkpoint), splits, result, progress)
    try:
        if config.int8:  # quantizes the graph before the detector's nodes join it
            export_int8(spec, images, config, result, progress)
    finally:
        if detector is not None:
            result.parity["ood"] = install_ood(result.model_path, detector, splits).record()
            atomic_write_json(result.parity_path, result.parity)
    if detector is not None and result.int8_path is not None:
        int8_detector = file_detector(result.int8_path, detector, splits, result, progress, refit=True)
        if int8_detector is not None:
            result.parity["int8"]["ood"] = install_ood(result.int8_path, int8_detector, splits).record()
            atomic_write_json(result.parity_path, result.parity)
    return result
