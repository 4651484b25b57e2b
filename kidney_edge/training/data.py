"""Training data: the run's splits, a Dataset over the shared preprocessing, augmentation, class weights."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kidney_edge import dataset
from kidney_edge.dataset import SPLITS, audit_path
from kidney_edge.errors import InputError
from kidney_edge.imaging import preprocess
from kidney_edge.layout import SPLITS_FILE
from kidney_edge.spec import ModelSpec

log = logging.getLogger(__name__)


def prepare_splits(data_dir: Path, splits: Path | None, run_dir: Path, *, seed: int) -> list:
    """The run's split rows, saved as RUN/splits.csv (+ RUN/splits_audit.json).

    Without ``splits`` the data folder is scanned and split 70/15/15 (grouped); with it, that
    file's rows are re-written into the run folder (paths re-based, so the copy stays valid).
    """
    out_csv = run_dir / SPLITS_FILE
    if splits is None:
        if not data_dir.is_dir():
            raise InputError(f"data folder {data_dir} does not exist or is not a folder (DATA argument)")
        rows = dataset.split_dataset(data_dir, out_csv, dataset.SplitConfig(seed=seed)).rows
    else:
        if not splits.is_file():
            raise InputError(f"--splits file {splits} does not exist")
        rows = dataset.read_splits(splits)
        dataset.write_splits(rows, out_csv)
        audit = audit_path(splits)
        if audit.is_file():
            shutil.copyfile(audit, audit_path(out_csv))
    check_splits(rows)
    return rows


def check_splits(rows: Sequence) -> tuple[str, ...]:
    """Class names (sorted) after checking every class appears in train, val and test."""
    class_names = tuple(sorted({row.label for row in rows}))
    if len(class_names) < 2:
        raise InputError(
            f"need at least 2 classes (one sub-folder per class), found {list(class_names)}; "
            "lay the data out as DATA/<Class>/<image>"
        )
    counts = Counter((row.label, row.split) for row in rows)
    for name in class_names:
        missing = [split for split in SPLITS if counts[(name, split)] == 0]
        if missing:
            total = sum(counts[(name, split)] for split in SPLITS)
            raise InputError(
                f"class {name!r} has {total} image(s) and none in the {'/'.join(missing)} split; "
                "a 70/15/15 split needs at least 7 images per class (more in practice): add images "
                "or remove the class folder"
            )
    return class_names


def rows_of(rows: Sequence, split: str, class_names: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    """Paths and (N,) int64 labels of one split, in the order of the CSV."""
    chosen = [row for row in rows if row.split == split]
    labels = np.array([class_names.index(row.label) for row in chosen], dtype=np.int64)
    return [Path(row.path) for row in chosen], labels


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency ("balanced") weights: n_samples / (n_classes * count_c)."""
    from sklearn.utils.class_weight import compute_class_weight

    classes = np.arange(num_classes)
    return compute_class_weight("balanced", classes=classes, y=labels).astype(np.float32)


def augmentation(spec: ModelSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """Train-only geometric augmentation on normalised (3, S, S) tensors (after the shared preprocessing).

    Small rotations/shifts/zooms: slices differ in patient position, not in orientation, so no
    flips. Uncovered corners are filled with the normalised value of black (air in CT).
    """
    from torchvision.transforms import v2

    fill = [float((0.0 - m) / s) for m, s in zip(spec.mean, spec.std, strict=True)]
    return v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1), fill=fill)


class SliceDataset(Dataset):
    """(path, label) pairs -> ((3, S, S) float32 tensor, label) through ``imaging.preprocess``."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, spec: ModelSpec) -> None:
        self.paths, self.labels, self.spec = list(paths), labels, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(preprocess(self.paths[index], self.spec))  # (3, S, S) float32
        return image, int(self.labels[index])
