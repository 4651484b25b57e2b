"""Dataset scan: classes from sub-folders (or the Kaggle labels file), every file hashed
(sha256 and a perceptual hash), unreadable and conflicting files listed instead of used.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kidney_edge.errors import ImageReadError, InputError
from kidney_edge.phantoms.kaggle_layout import LABELS_CSV, TRUTH_CSV

log = logging.getLogger(__name__)

IGNORED_FILES = frozenset({LABELS_CSV, TRUTH_CSV})
HASH_SIZE = 16  # 16x16 = 256-bit DCT hash: 64-bit hashes cannot tell CT slices of different patients apart
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ScannedImage:
    """One usable image: where it is, its class and its hashes."""

    path: Path  # absolute
    label: str
    sha256: str
    phash: bytes = field(default=b"", repr=False)  # 256-bit perceptual hash (32 bytes)
    thumbnail: bytes = field(default=b"", repr=False)  # 16x16 gray, for series links


@dataclass(frozen=True)
class ScanProblem:
    """A file the scan skipped, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class DatasetScan:
    """What :func:`scan_dataset` found: the class names, the usable images and the skipped files."""

    root: Path
    class_names: tuple[str, ...]
    items: list[ScannedImage]
    problems: list[ScanProblem]


def perceptual_hash(image: Image.Image, hash_size: int = HASH_SIZE) -> bytes:
    """DCT perceptual hash, the same algorithm as ``imagehash.phash`` (tested against it).

    Gray, resized to 4*hash_size square, 2-D DCT-II, the hash_size x hash_size lowest
    frequencies compared with their median; returns the bits packed into bytes.
    """
    side = 4 * hash_size
    pixels = np.asarray(image.convert("L").resize((side, side), Image.LANCZOS), dtype=np.float64)
    basis = _dct_basis(side)[:hash_size]  # (hash_size, side)
    low = basis @ pixels @ basis.T  # DCT-II along axis 0, then axis 1; lowest frequencies only
    bits = low > np.median(low)
    return np.packbits(bits.ravel()).tobytes()


@functools.lru_cache(maxsize=4)
def _dct_basis(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    return np.cos(np.pi * k * (2 * np.arange(n)[None, :] + 1) / (2 * n))


def scan_dataset(root: str | Path, *, progress: ProgressFn | None = None) -> DatasetScan:
    """Find, label, hash and decode every image under ``root``; report what cannot be used.

    Classes are the sub-folder names, or the ``Class`` column of ``kidneyData.csv`` when the
    folder has one (the Kaggle layout). Raises InputError when nothing usable is found.
    """
    root = _check_root(root)
    problems: list[ScanProblem] = []
    csv_labels = _read_labels_csv(root, problems)
    files = list(_walk_files(root, problems))
    candidates = _label_files(root, files, csv_labels, problems)
    from kidney_edge.imaging import load_image
    from kidney_edge.spec import ModelSpec

    decode_spec = ModelSpec(input_size=4 * HASH_SIZE)  # JPEG draft decode at 1/8 scale: fast
    items: list[ScannedImage] = []
    for done, (path, label) in enumerate(candidates, start=1):
        item = _scan_one(path, label, decode_spec, load_image, problems)
        if item is not None:
            items.append(item)
        if progress is not None:
            progress(done, len(candidates))
    items = _drop_label_conflicts(items, problems)
    class_names = _class_names(root, candidates, items, problems)
    if not items:
        raise InputError(_nothing_usable_message(root, files, problems))
    log.info(
        "scanned %s: %d usable images in %d classes, %d problems",
        root,
        len(items),
        len(class_names),
        len(problems),
    )
    return DatasetScan(root, class_names, items, problems)


def _check_root(root: str | Path) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise InputError(
            f"dataset folder {path} does not exist; pass the folder that holds the class sub-folders"
        )
    if not path.is_dir():
        raise InputError(
            f"dataset path {path} is not a folder; pass the folder that holds the class sub-folders"
        )
    return path.resolve()


def _walk_files(root: Path, problems: list[ScanProblem]) -> Iterator[Path]:
    """Every regular file under ``root`` (following symlinks once; loops reported, not followed)."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
            key = (info.st_dev, info.st_ino)
            if key in seen:
                problems.append(
                    ScanProblem(folder, "folder already scanned (symlink loop or duplicate link); skipped")
                )
                continue
            seen.add(key)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            problems.append(ScanProblem(folder, f"cannot read folder ({exc.strerror or exc})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files (.DS_Store, editor swap files) are not data
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(path)
                elif entry.is_file(follow_symlinks=True):
                    yield path
                else:
                    problems.append(ScanProblem(path, "not a regular file (broken link or special file)"))
            except OSError as exc:  # e.g. a symlink pointing to itself
                problems.append(ScanProblem(path, f"cannot follow ({exc.strerror or exc})"))


def _read_labels_csv(root: Path, problems: list[ScanProblem]) -> dict[str, str] | None:
    """kidneyData.csv -> {path relative to root (posix): class}, or None when there is none."""
    csv_path = root / LABELS_CSV
    if not csv_path.is_file():
        return None
    try:
        rows = list(csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8-sig"))))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(ScanProblem(csv_path, f"cannot read ({exc}); labels taken from folder names"))
        return None
    if not rows or "path" not in rows[0] or not ({"Class", "diag"} & set(rows[0])):
        problems.append(
            ScanProblem(csv_path, "needs columns path and Class (or diag); labels taken from folder names")
        )
        return None
    labels: dict[str, str] = {}
    for row in rows:
        label = (row.get("Class") or row.get("diag") or "").strip()
        rel = _csv_row_location(root, row)
        if label and rel is not None:
            labels[rel] = label
        else:
            problems.append(
                ScanProblem(csv_path, f"row {row.get('image_id') or row.get('path')!r}: file not found")
            )
    return labels


def _csv_row_location(root: Path, row: dict[str, str]) -> str | None:
    """Where a kidneyData.csv row's file is under root.

    The Kaggle file stores absolute Kaggle paths (/kaggle/input/.../Cyst/Cyst- (12).jpg), so
    besides the path as given we try its last two parts (class folder / file name), then
    ``<Class>/<image_id>.jpg``.
    """
    raw = (row.get("path") or "").strip().replace("\\", "/")
    parts = [p for p in raw.split("/") if p]
    label, image_id = (row.get("Class") or row.get("diag") or "").strip(), (row.get("image_id") or "").strip()
    by_id = f"{label}/{image_id}.jpg" if label and image_id else ""
    for candidate in ("/".join(parts), "/".join(parts[-2:]), "/".join(parts[-1:]), by_id):
        if candidate and not candidate.startswith("/") and (root / candidate).is_file():
            return candidate
    return None


def _label_files(
    root: Path, files: list[Path], csv_labels: dict[str, str] | None, problems: list[ScanProblem]
) -> list[tuple[Path, str]]:
    """(file, label) for every image file; non-images and files outside class folders are problems."""
    from kidney_edge.imaging import is_image_file

    labelled = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.parent == root and path.name in IGNORED_FILES:
            continue
        if not is_image_file(path):
            problems.append(
                ScanProblem(path, f"not an image file (suffix {path.suffix or 'none'!r}); skipped")
            )
            continue
        folder_label = rel.split("/")[0] if "/" in rel else None
        label = csv_labels.get(rel) if csv_labels is not None else None
        if label is None and folder_label is None:
            problems.append(ScanProblem(path, "image outside the class folders; move it into one"))
            continue
        if csv_labels is not None and label is None:
            problems.append(
                ScanProblem(path, f"not listed in {LABELS_CSV}; labelled by its folder {folder_label!r}")
            )
        labelled.append((path, label or folder_label))
    return labelled


def _scan_one(
    path: Path, label: str, spec: Any, load_image: Callable[..., Image.Image], problems: list[ScanProblem]
) -> ScannedImage | None:
    try:
        data = path.read_bytes()
        if not data:
            raise ImageReadError(path, "file is empty (0 bytes)")
        image = load_image(path, spec)  # proves the file decodes, with the same decoder as training
        phash = perceptual_hash(image)
        thumbnail = image.convert("L").resize((16, 16), Image.BOX).tobytes()
    except ImageReadError as exc:
        problems.append(ScanProblem(path, f"unreadable image: {exc.reason}"))
        return None
    except OSError as exc:
        problems.append(ScanProblem(path, f"cannot read ({exc.strerror or exc})"))
        return None
    return ScannedImage(path, label, hashlib.sha256(data).hexdigest(), phash, thumbnail)


def _drop_label_conflicts(items: list[ScannedImage], problems: list[ScanProblem]) -> list[ScannedImage]:
    """The same bytes under two classes cannot both be right: report them and keep neither."""
    labels_by_hash: dict[str, set[str]] = defaultdict(set)
    for item in items:
        labels_by_hash[item.sha256].add(item.label)
    conflicting = {h for h, labels in labels_by_hash.items() if len(labels) > 1}
    for item in items:
        if item.sha256 in conflicting:
            others = sorted(labels_by_hash[item.sha256] - {item.label})
            problems.append(
                ScanProblem(
                    item.path, f"label conflict: same content also filed as {', '.join(others)}; excluded"
                )
            )
    return [item for item in items if item.sha256 not in conflicting]


def _class_names(
    root: Path, candidates: list[tuple[Path, str]], items: list[ScannedImage], problems: list[ScanProblem]
) -> tuple[str, ...]:
    """Sorted classes with at least one usable image; class folders without one are reported."""
    used = {item.label for item in items}
    declared = {label for _, label in candidates}
    declared |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for label in sorted(declared - used):
        problems.append(ScanProblem(root / label, f"class {label!r} has no readable images; left out"))
    return tuple(sorted(used))


def _nothing_usable_message(root: Path, files: list[Path], problems: list[ScanProblem]) -> str:
    if not files:
        return (
            f"no files found in {root}; expected one sub-folder per class with images in it, "
            "e.g. Cyst/Cyst- (1).jpg, Normal/Normal- (1).jpg (the Kaggle layout)"
        )
    shown = "; ".join(f"{p.path.name}: {p.reason}" for p in problems[:3])
    return (
        f"no usable images in {root} ({len(files)} files, {len(problems)} problems, e.g. {shown}); "
        "expected one sub-folder per class with readable images"
    )
