"""Labelled images for evaluation, calibration and export: every image of a class-per-folder
tree, or one split of a splits.csv (read once into :class:`LabelledSplits` when several splits
of it are needed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.dataset import SPLITS, SplitRow, audit_path, read_splits, scan_dataset
from kidney_edge.errors import EmptySplitError, InputError
from kidney_edge.phantoms.kaggle_layout import TRUTH_CSV

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledFiles:
    """Images with their class names, where they came from, and the split audit when there is one.

    ``groups`` holds each image's split group (a patient, or near-duplicates kept together) when a
    splits.csv names them: the unit that confidence intervals resample. None for a plain folder.
    """

    paths: list[Path]
    labels: list[str]
    description: str
    audit: dict[str, Any] | None = None
    phantom: bool = False
    groups: list[str] | None = None


def load_labelled(data: Path, split: str, *, class_names: Sequence[str]) -> LabelledFiles:
    """Images and labels from a class-per-folder tree (all files) or one split of a splits.csv."""
    data = Path(data)
    if data.is_dir():
        files = _from_folder(data)
    elif data.suffix.lower() == ".csv":
        return _from_splits(data, split, class_names)
    else:
        raise InputError(f"data {data} is neither a folder of class sub-folders nor a splits.csv")
    _check_classes(files.labels, class_names, data)
    return files


@dataclass(frozen=True)
class LabelledSplits:
    """The rows of one splits.csv, read once: every split of it as :class:`LabelledFiles` on demand.

    Export reads one per export: its test and train rows feed parity, INT8 calibration and the
    gate, and the object itself every OOD fit, so the file is read (and its images checked for
    existence) once.
    """

    source: Path
    rows: tuple[SplitRow, ...]

    @classmethod
    def read(cls, csv_path: str | Path) -> LabelledSplits:
        """Read ``csv_path`` (InputError naming any missing files)."""
        return cls(Path(csv_path), tuple(read_splits(csv_path)))

    def files(self, split: str, class_names: Sequence[str]) -> LabelledFiles:
        """One split's images and labels (no audit); EmptySplitError when it has no rows,
        InputError when it holds classes the model does not know."""
        chosen = [row for row in self.rows if row.split == split]
        if not chosen:
            counts = {name: sum(row.split == name for row in self.rows) for name in SPLITS}
            raise EmptySplitError(
                f"split {split!r} of {self.source} is empty (rows per split: {counts}); choose another --split"
            )
        files = LabelledFiles(
            paths=[Path(row.path) for row in chosen],
            labels=[row.label for row in chosen],
            description=f"{self.source}",
            groups=[row.group for row in chosen],
        )
        _check_classes(files.labels, class_names, self.source)
        return files


def _from_folder(root: Path) -> LabelledFiles:
    scan = scan_dataset(root)
    for problem in scan.problems[:20]:
        log.warning("skipping %s: %s", problem.path, problem.reason)
    if not scan.items:
        raise InputError(
            f"no labelled images in {root}: expected one sub-folder per class with images inside"
        )
    return LabelledFiles(
        paths=[item.path for item in scan.items],
        labels=[item.label for item in scan.items],
        description=f"all images in folder {root}",
        phantom=(root / TRUTH_CSV).is_file(),
    )


def _from_splits(csv_path: Path, split: str, class_names: Sequence[str]) -> LabelledFiles:
    """One split of a splits.csv, with its audit and whether it is phantom data (for the report)."""
    files = LabelledSplits.read(csv_path).files(split, class_names)
    return dataclasses.replace(
        files, audit=_read_json(audit_path(csv_path)), phantom=_looks_like_phantom(files.paths)
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


def _looks_like_phantom(paths: Sequence[Path]) -> bool:
    """The phantom generator leaves phantom_truth.csv beside its class folders."""
    roots = {p.parent.parent for p in paths[:50]}
    return any((root / TRUTH_CSV).is_file() for root in roots)


def _check_classes(labels: Sequence[str], class_names: Sequence[str], data: Path) -> None:
    unknown = sorted(set(labels) - set(class_names))
    if unknown:
        raise InputError(
            f"the data's classes do not match the model's: {data} has {sorted(set(labels))}, "
            f"the model knows {list(class_names)} (unknown to the model: {unknown}); "
            "evaluate with data labelled in the model's classes"
        )
    missing = [c for c in class_names if c not in set(labels)]
    if missing:
        log.warning("classes %s have no images in %s; their recall and AUC are undefined", missing, data)


def class_indices(labels: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Class names -> (N,) int64 indices into ``class_names`` (the spec's order)."""
    lookup = {name: index for index, name in enumerate(class_names)}
    return np.array([lookup[label] for label in labels], dtype=np.int64)
