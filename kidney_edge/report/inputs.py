"""What a report shows (:class:`ReportInputs`) and what writing one produces (:class:`ReportFiles`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.spec import ModelSpec

GALLERY_LIMIT = 12


@dataclass(frozen=True)
class GalleryItem:
    """One misclassified image: the resized input and, when available, its Grad-CAM overlay."""

    path: Path
    true_label: str
    predicted_label: str
    confidence: float  # probability of the (wrong) predicted class
    image: Any  # PIL.Image at the model's input size
    overlay: Any | None = None  # PIL.Image RGB heatmap overlay, None when Grad-CAM is unavailable


@dataclass(frozen=True)
class ReportInputs:
    """What the report shows. ``metrics`` is the content of metrics.json."""

    spec: ModelSpec
    metrics: dict[str, Any]
    y_true: np.ndarray  # (N,) true class indices
    probabilities: np.ndarray  # (N, C) calibrated probabilities (the spec's temperature)
    model_path: str
    data_description: str
    split: str
    history_csv: Path | None = None
    audit: dict[str, Any] | None = None
    gallery: Sequence[GalleryItem] = ()
    gallery_note: str = ""
    phantom_data: bool = False
    notes: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class ReportFiles:
    """The files :func:`~kidney_edge.report.write_report` wrote."""

    html: Path
    markdown: Path
    model_card: Path
    images: tuple[Path, ...]
