"""What export runs on: the checkpoint and splits.csv of a run folder, the default output
folder, and the images for parity, INT8 calibration and the gate (with the run's splits read
once, for the OOD fit too).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kidney_edge.errors import InputError
from kidney_edge.layout import BEST_CHECKPOINT, LAST_CHECKPOINT, SPLITS_FILE
from kidney_edge.runtime import scan_images
from kidney_edge.runtime.layout import (
    EXPORT_ROOT,
)
from kidney_edge.spec import ModelSpec

if TYPE_CHECKING:
    from kidney_edge.labelled import LabelledSplits

log = logging.getLogger(__name__)


def resolve_source(source: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """RUN folder -> (RUN/best.pt, RUN/splits.csv or None); checkpoint file -> (file, None)."""
    source = Path(source)
    if source.is_dir():
        checkpoint = source / BEST_CHECKPOINT
        if not checkpoint.is_file():
            raise InputError(
                f"{source} has no {BEST_CHECKPOINT}; pass a run folder written by `kidney-edge train` or a checkpoint file"
            )
        splits = source / SPLITS_FILE
        return checkpoint, splits if splits.is_file() else None
    if source.suffix.lower() == ".onnx":
        raise InputError(f"{source} is already ONNX; export takes a run folder or a .pt checkpoint")
    if not source.is_file():
        raise InputError(f"{source}: no such run folder or checkpoint file")
    return source, None


def default_out_dir(
    source: str | os.PathLike[str], export_root: str | os.PathLike[str] = EXPORT_ROOT
) -> Path:
    """export/<run name> for RUN or RUN/best.pt; export/<file stem> for another checkpoint file."""
    source = Path(source).resolve()
    if source.is_dir():
        return Path(export_root) / source.name
    run_checkpoints = (Path(BEST_CHECKPOINT).stem, Path(LAST_CHECKPOINT).stem)
    return Path(export_root) / (source.parent.name if source.stem in run_checkpoints else source.stem)


@dataclass
class EvaluationImages:
    """Images export runs on: parity + the INT8 gate's labelled deltas (test), INT8 calibration
    (train), and every image for the gate's label-free agreement (test, val, train)."""

    test_paths: list[Path]
    test_labels: np.ndarray | None  # (N,) class indices in spec order; None without a labelled split
    calibration_paths: list[Path]
    origin: str  # where they came from, for parity.json
    warnings: list[str] = field(default_factory=list)
    splits: LabelledSplits | None = None  # the splits.csv they came from, for the OOD fit; None for --images
    val_paths: list[Path] = field(default_factory=list)

    @property
    def unlabelled_paths(self) -> list[Path]:
        """Images the gate compares INT8 with fp32 on besides the test split (duplicates and all)."""
        return [*self.val_paths, *self.calibration_paths]


def select_images(
    splits: Path | None, images: Sequence[Path], spec: ModelSpec, seed: int = 0
) -> EvaluationImages:
    """Test and train images from ``splits`` (a splits.csv), else the given image files/folders."""
    if splits is not None:
        return _images_from_splits(splits, spec, seed)
    if images:
        paths = _expand_images(images)
        note = (
            f"no splits.csv: parity and INT8 calibration use the {len(paths)} --images, and the INT8 "
            "gate compares with the fp32 model's own decisions (no labels)"
        )
        log.info(note)
        return EvaluationImages(
            paths, None, shuffled_paths(paths, seed), f"--images ({len(paths)} files)", [note]
        )
    raise InputError(
        "export checks parity on real images, but this checkpoint has no run folder with splits.csv: "
        "pass --splits RUN/splits.csv or --images FOLDER"
    )


def _images_from_splits(splits: Path, spec: ModelSpec, seed: int) -> EvaluationImages:
    from kidney_edge.labelled import LabelledSplits

    labelled = LabelledSplits.read(splits)
    rows = labelled.rows
    test = [row for row in rows if row.split == "test"]
    if not test:
        raise InputError(f"{splits} has no test rows; export needs a test split for parity and the INT8 gate")
    unknown = sorted({row.label for row in test} - set(spec.class_names))
    if unknown:
        raise InputError(
            f"{splits}: labels {unknown} are not among the model's classes {list(spec.class_names)}; "
            "pass the splits.csv of the run that trained this model"
        )
    labels = np.array([spec.class_names.index(row.label) for row in test], dtype=np.int64)
    train = shuffled_paths([row.path for row in rows if row.split == "train"], seed)
    origin = f"{splits} (test split: {len(test)} images; train split: {len(train)} images)"
    val = [row.path for row in rows if row.split == "val"]
    return EvaluationImages([row.path for row in test], labels, train, origin, splits=labelled, val_paths=val)


def _expand_images(images: Sequence[Path]) -> list[Path]:
    paths: list[Path] = []
    for item in images:
        if Path(item).is_dir():
            paths.extend(scan_images(item))
        elif Path(item).is_file():
            paths.append(Path(item))
        else:
            raise InputError(f"--images {item}: no such file or folder")
    if not paths:
        raise InputError(f"--images {', '.join(map(str, images))}: no image files found")
    return paths


def shuffled_paths(paths: Sequence[Path], seed: int) -> list[Path]:
    """``paths`` in an order fixed by ``seed``: calibration and parity take the first N, and
    shuffled, those N cover every class."""
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    return shuffled
