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
from kidney_edge.spec import ColorMode, ModelSpec
from kidney_edge.training.config import Augmentation

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


def augmentation(spec: ModelSpec, policy: Augmentation | str = Augmentation.geometric) -> Callable[[torch.Tensor], torch.Tensor]:
    """Train-only augmentation on normalised (3, S, S) tensors (after the shared preprocessing).

    ``geometric``: small rotations/shifts/zooms; uncovered corners are filled with the
    normalised value of black (air in CT). ``scanner`` adds what varies between scanners and
    patients but never changes the class: a left-right mirror (a finding lies in either
    kidney), the display window (contrast, brightness, gamma), the reconstruction kernel (blur
    or sharpen), quantum noise, JPEG quality, and a wider zoom range for matrix size and field
    of view. Without it a few hundred slices are learnt by their scanner settings, not their
    findings (benchmarks/results/recipe.md).
    """
    from torchvision.transforms import v2

    fill = [float((0.0 - m) / s) for m, s in zip(spec.mean, spec.std, strict=True)]
    if Augmentation(policy) is Augmentation.geometric:
        return v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1), fill=fill)
    return _ScannerAugment(spec, v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.85, 1.25), fill=0.0))


class _ScannerAugment:
    """The ``scanner`` policy on [0, 1] pixel values: the affine (air fills the corners), then
    window, kernel, noise and JPEG. The window moves the level and width but keeps air black,
    as any abdominal window does."""

    def __init__(self, spec: ModelSpec, affine: Callable[[torch.Tensor], torch.Tensor]) -> None:
        from torchvision.transforms import v2

        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1) / 255.0
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1) / 255.0
        self.affine = affine
        self.gray = spec.color_mode is ColorMode.GRAY
        self.blur = v2.GaussianBlur(5, sigma=(0.3, 1.2))
        self.jpeg = v2.JPEG((50, 95))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # (3, S, S) normalised
        pixels = image * self.std + self.mean  # (3, S, S) in [0, 1]
        gray = bool(self.gray and torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[0], pixels[2]))
        if gray:  # one plane does the work of three
            pixels = pixels[:1]
        pixels = self.affine(pixels)
        if torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        low, high = _uniform(-0.03, 0.1), _uniform(0.8, 1.15)
        pixels = ((pixels - low) / (high - low)).clamp(0, 1) ** _uniform(0.8, 1.25)
        kernel = torch.rand(())
        if kernel < 0.3:
            pixels = self.blur(pixels)
        elif kernel < 0.5:  # unsharp mask: a sharper reconstruction kernel
            pixels = (pixels + _uniform(0.3, 1.0) * (pixels - self.blur(pixels))).clamp(0, 1)
        if torch.rand(()) < 0.5:
            pixels = (pixels + torch.randn_like(pixels[:1]) * _uniform(0.005, 0.04)).clamp(0, 1)
        if torch.rand(()) < 0.3:
            pixels = self.jpeg((pixels * 255).round().to(torch.uint8)).float() / 255
        if gray:
            pixels = pixels.expand(3, -1, -1)
        return (pixels - self.mean) / self.std


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


class SliceDataset(Dataset):
    """(path, label) pairs -> ((3, S, S) float32 tensor, label) through ``imaging.preprocess``."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, spec: ModelSpec) -> None:
        self.paths, self.labels, self.spec = list(paths), labels, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(preprocess(self.paths[index], self.spec))  # (3, S, S) float32
        return image, int(self.labels[index])
