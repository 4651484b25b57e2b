"""Dataset scan, leakage-safe stratified splits and the leakage audit.

Published results on the Kaggle kidney CT dataset go wrong at the split: adjacent slices of one
patient and byte-identical copies land on both sides of a random split. Here the unit of the
split is a *group* of images that must stay together:

- exact duplicates (same sha256),
- near duplicates (perceptual hash within ``near_dup_distance`` bits; adjacent slices of one
  patient look nearly alike, so this also keeps most patients together) of one label,
- series neighbours: files of one label numbered next to each other whose thumbnails differ by
  at most ``series_distance`` (scanners number a patient's slices consecutively),
- optional patient groups from ``group_pattern``: a regex searched in the path relative to the
  dataset folder; the first capture group (or the whole match if the regex has no group) is the
  group key, so files with the same key stay together; files it does not match form no group.
  Example for the Kaggle names ``Cyst/Cyst- (123).jpg``: ``'^(.*\\(\\d*)\\d\\)'`` puts blocks of
  ten consecutive numbers (120-129) together.

Near-duplicate and series links join images by single linkage, which chains look-alike
patients into ever larger groups. A group above ``max_group_share`` of the images, or too coarse
for its class's split shares, is therefore cut at its weakest links; exact duplicates and
pattern keys are never cut.

Groups are assigned to train/val/test so that each class's split proportions match the target
ratios and validation and test hold ``min_eval_images`` of every class (greedy by group size,
local moves, then an exact deal for a class still off). The audit records counts, groups, cuts,
how many val/test images still have a twin in train (in ``grouped`` mode only across cut links)
and a ``warnings`` list of the goals missed.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kidney_edge.errors import ImageReadError, InputError
from kidney_edge.io_utils import atomic_write_csv, atomic_write_json
from kidney_edge.layout import AUDIT_SUFFIX

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABELS_CSV = "kidneyData.csv"  # the Kaggle dataset's label file
IGNORED_FILES = frozenset({LABELS_CSV, "phantom_truth.csv"})
HASH_SIZE = 16  # 16x16 = 256-bit DCT hash: 64-bit hashes cannot tell CT slices of different patients apart
# Hamming distance (of 256 bits) below which two images are near duplicates. Chosen on phantom
# patients: adjacent slices of one patient stay within it, different patients rarely come close
# (distributions in benchmarks/results/data.md).
DEFAULT_NEAR_DUP_DISTANCE = 32
# Thumbnail difference below which consecutively numbered files are one series (see _series_pairs);
# on phantom data adjacent slices of one patient stay below 0.16, neighbours from different patients above 0.18.
DEFAULT_SERIES_DISTANCE = 0.17
# Largest share of a dataset's images one group may hold (exact duplicates and --group-pattern
# keys excepted). Single-linkage grouping chains look-alike patients together; a group above a
# few percent cannot be placed without skewing a class's val/test share (validation and test are
# 15% each), so chains above it are cut at their weakest links (see _cut_groups).
DEFAULT_MAX_GROUP_SHARE = 0.05
# Largest deviation of a class's split shares from the ratios (as a share of the class's images)
# that the grouped split aims at; a class whose groups are too coarse for it has them cut further.
DEFAULT_PROPORTION_TOLERANCE = 0.02
# Images of every class that validation and test should each hold: fewer make per-class recall a
# coin toss (one Stone in val decides its recall alone). Below it the audit warns.
DEFAULT_MIN_EVAL_IMAGES = 5
ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------- scan


@dataclass(frozen=True)
class ScannedImage:
    path: Path  # absolute
    label: str
    sha256: str
    phash: bytes = field(default=b"", repr=False)  # 256-bit perceptual hash (32 bytes)
    thumbnail: bytes = field(default=b"", repr=False)  # 16x16 gray, for series links


@dataclass(frozen=True)
class ScanProblem:
    path: Path
    reason: str


@dataclass(frozen=True)
class DatasetScan:
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


# ----------------------------------------------------------------------------- split


@dataclass(frozen=True)
class SplitRow:
    path: Path  # absolute
    label: str
    split: str  # "train" | "val" | "test"
    group: str
    sha256: str


@dataclass(frozen=True)
class SplitResult:
    rows: list[SplitRow]
    audit: dict[str, Any]


@dataclass(frozen=True)
class SplitConfig:
    """Options of ``kidney-edge split``; messages name the CLI flags."""

    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    mode: str = "grouped"
    group_pattern: str | None = None
    near_dup_distance: int | None = DEFAULT_NEAR_DUP_DISTANCE
    series_distance: float | None = DEFAULT_SERIES_DISTANCE
    max_group_share: float | None = DEFAULT_MAX_GROUP_SHARE
    proportion_tolerance: float = DEFAULT_PROPORTION_TOLERANCE
    min_eval_images: int = DEFAULT_MIN_EVAL_IMAGES

    def __post_init__(self) -> None:
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1) > 1e-6:
            raise InputError(
                f"--ratios must be three non-negative numbers summing to 1, e.g. 0.7,0.15,0.15 (got {self.ratios})"
            )
        if self.ratios[0] <= 0:
            raise InputError("--ratios: the train share must be above 0")
        if self.mode not in ("grouped", "random"):
            raise InputError(f"--split-mode must be 'grouped' or 'random' (got {self.mode!r})")
        if self.group_pattern is not None:
            try:
                re.compile(self.group_pattern)
            except re.error as exc:
                raise InputError(f"--group-pattern is not a valid regular expression: {exc}") from None
        if self.near_dup_distance is not None and not 0 <= self.near_dup_distance <= HASH_SIZE**2 // 2:
            raise InputError(
                f"--near-dup-distance must be between 0 and {HASH_SIZE**2 // 2} bits, or -1 to turn it off "
                f"(got {self.near_dup_distance})"
            )
        if self.series_distance is not None and not 0 <= self.series_distance <= 2:
            raise InputError(
                f"--series-distance must be between 0 and 2, or -1 to turn it off (got {self.series_distance})"
            )
        if self.max_group_share is not None and not 0 < self.max_group_share <= 1:
            raise InputError(
                "--max-group-share must be above 0 and at most 1 (a share of all images), or -1 to never "
                f"cut groups (got {self.max_group_share})"
            )
        if not 0 < self.proportion_tolerance <= 1:
            raise InputError(
                f"--proportion-tolerance must be above 0 and at most 1 (got {self.proportion_tolerance})"
            )
        if self.min_eval_images < 0:
            raise InputError(f"--min-eval-images must be 0 or more (got {self.min_eval_images})")


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def near_duplicate_pairs(hashes: Sequence[bytes], max_distance: int, chunk: int = 512) -> np.ndarray:
    """(P, 2) index pairs i < j whose hashes differ in at most ``max_distance`` bits.

    Vectorised XOR + popcount over uint64 words, a block of rows at a time: 12,500 hashes of
    256 bits take about a second.
    """
    if len(hashes) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    words = np.frombuffer(b"".join(hashes), dtype=np.uint64).reshape(len(hashes), -1)
    columns = [np.ascontiguousarray(words[:, w]) for w in range(words.shape[1])]
    found = []
    for start in range(0, len(words), chunk):
        # One uint64 word at a time, summed in uint16: numpy reduces a length-4 axis slowly.
        distance = np.zeros((min(chunk, len(words) - start), len(words) - start), dtype=np.uint16)
        for column in columns:
            distance += np.bitwise_count(column[start : start + chunk, None] ^ column[None, start:])
        i, j = np.nonzero(distance <= max_distance)  # j counts from `start`: only pairs with j >= i
        keep = j > i  # j is relative to `start`, i to the block
        found.append(np.stack([i[keep] + start, j[keep] + start], axis=1))
    return np.concatenate(found).astype(np.int64)


@dataclass(frozen=True)
class _Links:
    """Similarity links between items, each with how close it came to its threshold."""

    pairs: np.ndarray  # (P, 2) int64 item indices, i < j
    distance: np.ndarray  # (P,) float64 distance over the link's threshold: 0 alike .. 1 barely linked
    tier: np.ndarray  # (P,) int64: links of a lower tier are stronger evidence than any of a higher one

    @staticmethod
    def of(pairs: np.ndarray, distance: np.ndarray, tier: int) -> _Links:
        return _Links(pairs, distance, np.full(len(pairs), tier, dtype=np.int64))

    @staticmethod
    def empty() -> _Links:
        return _Links.of(np.zeros((0, 2), dtype=np.int64), np.zeros(0), 0)

    @staticmethod
    def concat(parts: Sequence[_Links]) -> _Links:
        return _Links(
            *(
                np.concatenate([getattr(part, name) for part in parts])
                for name in ("pairs", "distance", "tier")
            )
        )

    def where(self, keep: np.ndarray) -> _Links:
        return _Links(self.pairs[keep], self.distance[keep], self.tier[keep])


# Link tiers. Series links rank before every hash link: file order and looks together are
# stronger evidence of one patient than looks alone, which look-alike patients share, so a chain
# of look-alike patients is cut at its hash links first.
_SERIES_TIER, _HASH_TIER = 0, 1
# A series link at least this weak (distance over its threshold) may be cut to make a class's
# groups fine enough for its split shares; a stronger one, the best evidence of one patient
# there is, only to respect --max-group-share. Between adjacent slices of one phantom patient the
# distance stays below 0.6 on both renderers, between neighbouring patients above 0.9
# (series distances in benchmarks/results/data.md).
_WEAK_SERIES_LINK = 0.75


def _scaled(distance: np.ndarray, threshold: float) -> np.ndarray:
    """Distances over the threshold that admitted them, so hash and series links compare."""
    distance = np.asarray(distance, dtype=np.float64)
    return distance / threshold if threshold > 0 else np.zeros_like(distance)


def _hash_distances(hashes: Sequence[bytes], pairs: np.ndarray) -> np.ndarray:
    """(P,) Hamming distance in bits between the hashes of each pair."""
    words = np.frombuffer(b"".join(hashes), dtype=np.uint64).reshape(len(hashes), -1)
    return np.bitwise_count(words[pairs[:, 0]] ^ words[pairs[:, 1]]).sum(axis=1)


@dataclass(frozen=True)
class _Grouping:
    group_of: np.ndarray  # (N,) group index per item
    names: list[str]
    near_pairs: np.ndarray  # (P, 2) near-duplicate or same-series pairs (different bytes)
    hash_pairs: int
    series_pairs: int
    exact_groups: int
    exact_files: int
    near_groups: int
    near_files: int
    pattern_groups: int | None
    targets: _Targets  # per split and class: what the assignment aims at, and what the cuts allowed for
    bound: int | None  # most images a group may hold unless it is one atom; None: never cut
    links_cut: int
    groups_cut: int


def _group_items(scan: DatasetScan, config: SplitConfig) -> _Grouping:
    """Groups that must not cross splits.

    Exact duplicates and pattern keys are *atoms*, never divided. Near-duplicate and series links
    join atoms by single linkage, which chains: look-alike patients, each linked to the next, end
    up in one group. Such groups are cut at their weakest links until none holds more than
    ``max_group_share`` of the images and every class can be split within
    ``proportion_tolerance`` (:func:`_cut_groups`).
    """
    items = scan.items
    atoms_uf = _UnionFind(len(items))
    by_hash: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_hash[item.sha256].append(index)
    for members in by_hash.values():
        for other in members[1:]:
            atoms_uf.union(members[0], other)
    pattern_groups = _apply_pattern(scan, config.group_pattern, atoms_uf) if config.group_pattern else None
    hash_links, series_links = _similar_pairs(scan, config)
    links = _Links.concat([hash_links, series_links])
    class_index = np.array([scan.class_names.index(item.label) for item in items])
    tree = _dendrogram(
        np.array([atoms_uf.find(i) for i in range(len(items))]),
        class_index,
        len(scan.class_names),
        links,
    )
    bound = None
    if config.max_group_share is not None:
        bound = max(1, math.floor(config.max_group_share * len(items) + 1e-9))
    targets = _Targets.of(
        np.bincount(class_index, minlength=len(scan.class_names)),
        config.ratios,
        config.min_eval_images,
        config.proportion_tolerance,
    )
    cut = _cut_groups(tree, len(items) if bound is None else bound, targets)
    order = sorted(range(len(items)), key=lambda i: items[i].path.as_posix())
    index_of_group: dict[int, int] = {}
    for i in order:  # number groups by their first file, so names are stable for a dataset
        index_of_group.setdefault(int(cut.group_of[i]), len(index_of_group))
    near_uf = _UnionFind(len(items))
    for i, j in links.pairs:
        near_uf.union(int(i), int(j))
    near_sizes = Counter(near_uf.find(i) for i in range(len(items)))
    exact_sizes = [len(m) for m in by_hash.values() if len(m) > 1]
    return _Grouping(
        group_of=np.array([index_of_group[int(g)] for g in cut.group_of]),
        names=[f"g{k:05d}" for k in range(len(index_of_group))],
        near_pairs=np.unique(links.pairs, axis=0),
        hash_pairs=len(hash_links.pairs),
        series_pairs=len(series_links.pairs),
        exact_groups=len(exact_sizes),
        exact_files=sum(exact_sizes),
        near_groups=sum(1 for n in near_sizes.values() if n > 1),
        near_files=sum(n for n in near_sizes.values() if n > 1),
        pattern_groups=pattern_groups,
        targets=targets,
        bound=bound,
        links_cut=cut.links_cut,
        groups_cut=cut.groups_cut,
    )


@dataclass(frozen=True)
class _Dendrogram:
    """Single-linkage merge tree over atoms: nodes 0..n_atoms-1 are the atoms, and each later
    node k joins ``children[k]`` through the next-strongest link (Kruskal's algorithm)."""

    atom_of: np.ndarray  # (N,) atom (leaf node) per item
    children: np.ndarray  # (M, 2) int64 child nodes; -1 for atoms
    counts: np.ndarray  # (M, C) int64 images per node and class
    distance: np.ndarray  # (M,) float64 distance of the link that made each node; 0 for atoms
    tier: np.ndarray  # (M,) int64 tier of that link
    tops: list[int]  # one root per connected component

    def is_atom(self, node: int) -> bool:
        return bool(self.children[node, 0] < 0)

    def leaves(self, node: int) -> Iterator[int]:
        below = [node]
        while below:
            k = below.pop()
            if self.is_atom(k):
                yield k
            else:
                below.extend(self.children[k].tolist())


def _dendrogram(atom_of: np.ndarray, class_index: np.ndarray, n_classes: int, links: _Links) -> _Dendrogram:
    """Merge atoms (``atom_of``: an id per item, shared by items that must stay together) along
    ``links``, strongest first (lowest tier, then shortest distance); ties broken by atom index,
    so the tree is deterministic."""
    _, atom_index = np.unique(atom_of, return_inverse=True)
    n_atoms = int(atom_index.max()) + 1
    a, b = atom_index[links.pairs[:, 0]], atom_index[links.pairs[:, 1]]
    counts = np.zeros((2 * n_atoms - 1, n_classes), dtype=np.int64)
    np.add.at(counts, (atom_index, class_index), 1)
    children = np.full((2 * n_atoms - 1, 2), -1, dtype=np.int64)
    merge_distance, merge_tier = np.zeros(2 * n_atoms - 1), np.zeros(2 * n_atoms - 1, dtype=np.int64)
    uf = _UnionFind(n_atoms)
    node_of_root = list(range(n_atoms))
    node = n_atoms
    for e in np.lexsort((b, a, links.distance, links.tier)):
        ra, rb = uf.find(int(a[e])), uf.find(int(b[e]))
        if ra == rb:
            continue  # not a spanning-tree edge: the two are already joined by stronger links
        children[node] = node_of_root[ra], node_of_root[rb]
        counts[node] = counts[node_of_root[ra]] + counts[node_of_root[rb]]
        merge_distance[node], merge_tier[node] = links.distance[e], links.tier[e]
        uf.union(ra, rb)
        node_of_root[uf.find(ra)] = node
        node += 1
    tops = sorted({node_of_root[uf.find(k)] for k in range(n_atoms)})
    return _Dendrogram(
        atom_index, children[:node], counts[:node], merge_distance[:node], merge_tier[:node], tops
    )


@dataclass(frozen=True)
class _Cut:
    group_of: np.ndarray  # (N,) group id per item (equal within a group, not numbered 0..G-1)
    links_cut: int
    groups_cut: int  # connected components that were divided


def _cut_groups(tree: _Dendrogram, bound: int, targets: _Targets) -> _Cut:
    """Cut the single-linkage groups of ``tree`` at their weakest links, as few as needed so that

    1. no group holds more than ``bound`` images (a single atom beyond it stays whole), and
    2. each class's groups can be dealt so that every split holds between ``targets.low`` and
       ``targets.high`` images of it (:func:`_can_split`): while they cannot, the class's largest
       group is cut, unless its weakest link is a strong series link (``_WEAK_SERIES_LINK``):
       a group of consecutive files that look alike is one patient more likely than a chain.

    Cutting a group's weakest link removes its largest minimum-spanning-tree edge, which undoes
    the last merge that made it: every group is a node of the dendrogram. A chain of look-alike
    patients breaks between patients first, whose links are weaker than those within one.
    """
    groups, stack, links_cut = [], list(tree.tops), 0
    while stack:
        node = stack.pop()
        if tree.counts[node].sum() > bound and not tree.is_atom(node):
            links_cut += 1
            stack.extend(tree.children[node].tolist())
        else:
            groups.append(node)
    for c in range(tree.counts.shape[1]):
        while not _can_split(tree.counts[groups, c], targets.low[:, c], targets.high[:, c]):
            weak = [
                k
                for k, node in enumerate(groups)
                if tree.counts[node, c]
                and not tree.is_atom(node)
                and (tree.tier[node] != _SERIES_TIER or tree.distance[node] >= _WEAK_SERIES_LINK)
            ]
            if not weak:
                break  # the audit warns about the proportions this leaves
            widest = max(weak, key=lambda k: tree.counts[groups[k], c])
            groups.extend(tree.children[groups.pop(widest)].tolist())
            links_cut += 1
    group_of_atom = np.empty(len(tree.children), dtype=np.int64)
    for group, node in enumerate(groups):
        group_of_atom[list(tree.leaves(node))] = group
    kept = set(groups)
    return _Cut(group_of_atom[tree.atom_of], links_cut, sum(top not in kept for top in tree.tops))


@dataclass(frozen=True)
class _Reachable:
    """Which (val, test) image counts some choice of groups adds up to, and one such choice each."""

    reach: np.ndarray  # (V+1, T+1) bool: reach[v, t] when groups sum to v in val and t in test
    last: np.ndarray  # (V+1, T+1) int64: index of the last group of the first choice found; -1: none
    into_val: np.ndarray  # (V+1, T+1) bool: that group went to val (else to test)

    def choice(self, v: int, t: int, sizes: np.ndarray) -> tuple[list[int], list[int]]:
        """(groups in val, groups in test) adding up to ``reach[v, t]``."""
        val, test = [], []
        while v or t:  # each step goes back to a cell reached before that group was considered
            k = int(self.last[v, t])
            if self.into_val[v, t]:
                val.append(k)
                v -= int(sizes[k])
            else:
                test.append(k)
                t -= int(sizes[k])
        return val, test


def _reachable(sizes: np.ndarray, top_val: int, top_test: int) -> _Reachable:
    """Subset sums by dynamic programming over groups of ``sizes`` images, each to val, test or
    neither (train), up to ``top_val`` and ``top_test`` images."""
    reach = np.zeros((top_val + 1, top_test + 1), dtype=bool)
    reach[0, 0] = True
    last = np.full(reach.shape, -1, dtype=np.int64)
    into_val = np.zeros(reach.shape, dtype=bool)
    for k, size in enumerate(sizes.tolist()):
        if size <= 0:
            continue
        before = reach.copy()  # each group is used once
        for axis, top in ((0, top_val), (1, top_test)):
            if size > top:
                continue
            shifted = np.zeros_like(before)
            if axis == 0:
                shifted[size:] = before[: top + 1 - size]
            else:
                shifted[:, size:] = before[:, : top + 1 - size]
            new = shifted & ~reach
            last[new], into_val[new] = k, axis == 0
            reach |= new
    return _Reachable(reach, last, into_val)


def _can_split(sizes: np.ndarray, low: np.ndarray, high: np.ndarray) -> bool:
    """Whether groups of ``sizes`` images can be dealt so that train, val and test each hold
    between ``low`` and ``high`` (3,) of them."""
    if high[1] < 0 or high[2] < 0:
        return False
    held = np.zeros(3)  # a greedy deal first, largest group to the split furthest below its middle
    for size in np.sort(sizes)[::-1]:
        held[np.argmax((low + high) / 2 - held)] += size
    if ((held >= low) & (held <= high)).all():
        return True  # enough on large data, where the exact search below would take seconds
    found = _reachable(sizes, int(high[1]), int(high[2])).reach
    val, test = np.indices(found.shape)
    train = sizes.sum() - val - test
    return bool((found & (val >= low[1]) & (test >= low[2]) & (train >= low[0]) & (train <= high[0])).any())


def _similar_pairs(scan: DatasetScan, config: SplitConfig) -> tuple[_Links, _Links]:
    """(near duplicates by perceptual hash, same-series neighbours) of different bytes and one label.

    A look-alike filed under another class cannot hand the model the answer to a validation
    image, and at 16x16 or 256 bits every abdominal slice looks alike: links across labels would
    only chain the look-alike patients of all classes into one group.
    """
    items = scan.items
    hash_links = series_links = _Links.empty()
    if config.near_dup_distance is not None and all(item.phash for item in items):
        hashes = [item.phash for item in items]
        pairs = near_duplicate_pairs(hashes, config.near_dup_distance)
        distance = _scaled(_hash_distances(hashes, pairs), config.near_dup_distance)
        hash_links = _Links.of(pairs, distance, _HASH_TIER)
    if config.series_distance is not None:
        series_links = _series_pairs(scan, config.series_distance)
    label = np.unique([item.label for item in items], return_inverse=True)[1]
    content = np.unique([item.sha256 for item in items], return_inverse=True)[1]

    def kept(links: _Links) -> _Links:
        first, second = links.pairs[:, 0], links.pairs[:, 1]
        return links.where((label[first] == label[second]) & (content[first] != content[second]))

    return kept(hash_links), kept(series_links)


def _series_pairs(scan: DatasetScan, max_difference: float) -> _Links:
    """Pairs of files of one class numbered next to each other (``Cyst- (12)`` / ``Cyst- (13)``,
    or one number apart) whose 16x16 thumbnails differ by at most ``max_difference`` (mean
    absolute difference after normalising each to zero mean, unit std).

    Scanners and the Kaggle dataset number the slices of one patient consecutively. Adjacent
    slices can be further apart in perceptual-hash bits than the global near-duplicate distance
    (hash bits near the median flip under a one-pixel shift), while a thumbnail comparison is
    stable; restricting it to neighbouring numbers keeps unrelated look-alikes apart. A series
    is one label's files with one name pattern.
    """
    series: dict[tuple[str, str, str], list[tuple[int, int]]] = defaultdict(list)
    for index, item in enumerate(scan.items):
        match = _NUMBERED.match(_relative(item.path, scan.root))
        if match and item.thumbnail:
            series[(item.label, match.group(1), match.group(3))].append((int(match.group(2)), index))
    candidates = []
    for members in series.values():
        members.sort()
        for k, (number, i) in enumerate(members):
            for other_number, j in members[k + 1 : k + 3]:  # next two numbers: skips one interloper
                if other_number - number <= 2:
                    candidates.append((min(i, j), max(i, j)))
    pairs = np.array(candidates, dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        return _Links.empty()
    thumbs = _normalised_thumbnails(scan.items)
    difference = np.abs(thumbs[pairs[:, 0]] - thumbs[pairs[:, 1]]).mean(axis=1)
    keep = difference <= max_difference
    return _Links.of(pairs[keep], _scaled(difference[keep], max_difference), _SERIES_TIER)


_NUMBERED = re.compile(r"^(.*?)(\d+)(\D*)$")


def _normalised_thumbnails(items: Sequence[ScannedImage]) -> np.ndarray:
    """(N, 256) float32 thumbnails with zero mean and unit std each (zeros where missing)."""
    raw = np.zeros((len(items), 256), dtype=np.float32)
    for index, item in enumerate(items):
        if len(item.thumbnail) == 256:
            raw[index] = np.frombuffer(item.thumbnail, np.uint8)
    raw -= raw.mean(axis=1, keepdims=True)
    raw /= raw.std(axis=1, keepdims=True) + 1e-6
    return raw


def _apply_pattern(scan: DatasetScan, pattern: str, uf: _UnionFind) -> int:
    """Union files whose path (relative to the dataset folder) gives the same pattern key."""
    regex = re.compile(pattern)
    first_with_key: dict[str, int] = {}
    for index, item in enumerate(scan.items):
        match = regex.search(_relative(item.path, scan.root))
        if match is None:
            continue
        key = match.group(1) if regex.groups else match.group(0)
        if key in first_with_key:
            uf.union(first_with_key[key], index)
        else:
            first_with_key[key] = index
    if not first_with_key:
        log.warning("--group-pattern %r matched no file path; no patient groups formed", pattern)
    return len(first_with_key)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# A val/test image missing below a class's floor costs this many times a proportion error of one
# image: with fewer than a handful of images of a class, its recall on that split is noise.
_SHORTFALL_WEIGHT = 10.0


def _penalty(images: np.ndarray, target: np.ndarray, floor: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Squared error of holding ``images`` instead of ``target``, plus the weighted squared
    shortfall below ``floor``, both as shares of the class's ``total`` (broadcasting)."""
    error = (images - target) / total
    shortfall = np.maximum(floor - images, 0) / total
    return error**2 + _SHORTFALL_WEIGHT * shortfall**2


@dataclass(frozen=True)
class _Targets:
    """What the grouped split aims at, per split and class, and how far off a split is."""

    target: np.ndarray  # (3, C) images wanted per split and class
    floor: np.ndarray  # (3, C) fewest wanted: min(min_eval_images, target) for val/test, 0 for train
    slack: np.ndarray  # (C,) images a split may hold above or below its target: the tolerance, >= 1
    low: np.ndarray  # (3, C) fewest accepted: target - slack, and not below the floor
    high: np.ndarray  # (3, C) most accepted: target + slack
    totals: np.ndarray  # (C,) images per class (at least 1)
    closed: np.ndarray  # (3,) bool: splits with ratio 0 take no group

    @staticmethod
    def of(
        class_sizes: np.ndarray, ratios: Sequence[float], min_eval_images: int, tolerance: float
    ) -> _Targets:
        totals = np.maximum(class_sizes, 1)
        target = np.outer(ratios, totals)
        floor = np.minimum(target, min_eval_images)
        floor[0] = 0  # train holds most of every class anyway
        slack = np.maximum(tolerance * totals, 1.0)  # never tighter than one image
        closed = np.array([r <= 0 for r in ratios])
        low, high = np.maximum(target - slack, floor), target + slack
        low[closed], high[closed] = 0, 0
        return _Targets(target, floor, slack, low, high, totals, closed)

    def cost(self, rows: np.ndarray, s: int) -> np.ndarray:
        """Cost of split ``s`` holding ``rows`` (..., C) images: :func:`_penalty` summed over classes."""
        return _penalty(rows, self.target[s], self.floor[s], self.totals).sum(axis=-1)

    def class_cost(self, c: int, held: Sequence[np.ndarray]) -> np.ndarray:
        """Cost of class ``c`` alone, ``held[s]`` images of it in split s: summed over splits."""
        return sum(
            _penalty(images, self.target[s, c], self.floor[s, c], self.totals[c])
            for s, images in enumerate(held)
        )

    def missed(self, current: np.ndarray) -> list[int]:
        """Classes some split holds fewer than ``low`` or more than ``high`` images of."""
        outside = (current < self.low - 1e-9) | (current > self.high + 1e-9)
        return np.nonzero(outside[~self.closed].any(axis=0))[0].tolist()

    def off_ratio(self, current: np.ndarray) -> list[int]:
        """Classes some split holds more than ``slack`` images away from its target of."""
        return np.nonzero((np.abs(current - self.target) > self.slack + 1e-9).any(axis=0))[0].tolist()


def _assign_grouped(
    group_of: np.ndarray, class_index: np.ndarray, targets: _Targets, seed: int
) -> np.ndarray:
    """Split index per group: largest groups first, each to the split that most lacks its classes;
    then local moves and swaps while they lower the cost; then an exact deal of the groups of any
    class still outside its tolerance."""
    counts = np.zeros((group_of.max() + 1, len(targets.totals)))
    np.add.at(counts, (group_of, class_index), 1)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(counts))  # seeded order among groups of equal size
    order = perm[np.argsort(-counts.sum(axis=1)[perm], kind="stable")]
    current = np.zeros_like(targets.target)
    split_of = np.empty(len(counts), dtype=np.int64)
    for g in order:
        score = ((targets.target - current) / targets.totals) @ counts[g]
        score[targets.closed] = -np.inf
        s = int(np.argmax(score))
        split_of[g] = s
        current[s] += counts[g]
    _improve(split_of, counts, current, targets, rng)
    for c in targets.missed(current):
        _deal_class(c, split_of, counts, current, targets, rng)
    return split_of


def _deal_class(
    c: int,
    split_of: np.ndarray,
    counts: np.ndarray,
    current: np.ndarray,
    targets: _Targets,
    rng: np.random.Generator,
) -> None:
    """Re-deal the groups holding only class ``c`` to the cheapest (val, test) counts within its
    tolerance, found exactly by :func:`_reachable`; single moves and swaps miss deals that need
    one large group to change places with two small ones."""
    own = rng.permutation(np.nonzero((counts[:, c] > 0) & (counts.sum(axis=1) == counts[:, c]))[0])
    if not len(own):
        return
    sizes = counts[own, c].astype(np.int64)
    fixed = current[:, c] - np.array([sizes[split_of[own] == s].sum() for s in range(3)])
    top_val, top_test = (int(targets.high[s, c] - fixed[s]) for s in (1, 2))
    if top_val < 0 or top_test < 0:
        return
    found = _reachable(sizes, top_val, top_test)
    val, test = np.indices(found.reach.shape)
    held = (fixed[0] + sizes.sum() - val - test, fixed[1] + val, fixed[2] + test)
    cost = np.where(found.reach, targets.class_cost(c, held), np.inf)
    v, t = np.unravel_index(int(np.argmin(cost)), cost.shape)
    if cost[v, t] >= targets.class_cost(c, current[:, c]) - 1e-12:
        return
    into_val, into_test = found.choice(int(v), int(t), sizes)
    split_of[own] = 0
    split_of[own[into_val]], split_of[own[into_test]] = 1, 2
    current[:, c] = fixed + [sizes.sum() - v - t, v, t]


def _improve(
    split_of: np.ndarray,
    counts: np.ndarray,
    current: np.ndarray,
    targets: _Targets,
    rng: np.random.Generator,
    passes: int = 4,
) -> None:
    """Move single groups between splits while that lowers the cost, then try swaps."""
    for _ in range(passes):
        if np.abs(current - targets.target).max() <= 1.0:
            break  # every split/class count is within one image of its target: rounding level
        moved = False
        for g in rng.permutation(len(counts)):
            s = split_of[g]
            for t in range(len(targets.target)):
                if t == s or targets.closed[t]:
                    continue
                before = targets.cost(current[s], s) + targets.cost(current[t], t)
                after = targets.cost(current[s] - counts[g], s) + targets.cost(current[t] + counts[g], t)
                if after < before - 1e-12:
                    current[s] -= counts[g]
                    current[t] += counts[g]
                    split_of[g], s, moved = t, t, True
        moved |= _swap_pass(split_of, counts, current, targets, rng)
        if not moved:
            break


def _swap_pass(
    split_of: np.ndarray,
    counts: np.ndarray,
    current: np.ndarray,
    targets: _Targets,
    rng: np.random.Generator,
) -> bool:
    """Exchange two groups of different splits when that lowers the cost (vectorised over partners)."""
    swapped = False
    for g in rng.permutation(len(counts)):
        s = split_of[g]
        for t in range(len(targets.target)):
            partners = np.nonzero(split_of == t)[0]
            if t == s or targets.closed[t] or not len(partners):
                continue
            before = targets.cost(current[s], s) + targets.cost(current[t], t)
            moved = counts[partners] - counts[g]  # (H, C) what s gains and t loses
            after = targets.cost(current[s] + moved, s) + targets.cost(current[t] - moved, t)
            best = int(np.argmin(after))
            if after[best] < before - 1e-12:
                h = partners[best]
                current[s] += moved[best]
                current[t] -= moved[best]
                split_of[g], split_of[h], s, swapped = t, s, t, True
    return swapped


def _assign_random(class_index: np.ndarray, n_classes: int, ratios: Sequence[float], seed: int) -> np.ndarray:
    """Per-image stratified split that ignores groups: only to show the leak it makes."""
    rng = np.random.default_rng(seed)
    split_of = np.empty(len(class_index), dtype=np.int64)
    for c in range(n_classes):
        members = rng.permutation(np.nonzero(class_index == c)[0])
        cuts = np.round(np.cumsum(ratios)[:-1] * len(members)).astype(int)
        for s, part in enumerate(np.split(members, cuts)):
            split_of[part] = s
    return split_of


def make_splits(
    scan: DatasetScan,
    *,
    ratios: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    mode: str = "grouped",
    group_pattern: str | None = None,
    near_dup_distance: int | None = DEFAULT_NEAR_DUP_DISTANCE,
    series_distance: float | None = DEFAULT_SERIES_DISTANCE,
    max_group_share: float | None = DEFAULT_MAX_GROUP_SHARE,
    proportion_tolerance: float = DEFAULT_PROPORTION_TOLERANCE,
    min_eval_images: int = DEFAULT_MIN_EVAL_IMAGES,
) -> SplitResult:
    """Stratified train/val/test split of ``scan``; deterministic for ``seed``.

    ``grouped`` (default): duplicate, near-duplicate and pattern groups never cross splits.
    Near-duplicate and series groups are cut at their weakest links where they hold more than
    ``max_group_share`` of the images (None: no limit) or are too coarse to split every class
    within ``proportion_tolerance``. Validation and test aim at ``min_eval_images`` of every
    class. The audit's ``warnings`` say where a goal was missed.
    ``random``: every image on its own, which leaks; it exists to show that, and says so.
    """
    config = SplitConfig(
        ratios=tuple(float(r) for r in ratios),
        seed=seed,
        mode=mode,
        group_pattern=group_pattern,
        near_dup_distance=near_dup_distance,
        series_distance=series_distance,
        max_group_share=max_group_share,
        proportion_tolerance=proportion_tolerance,
        min_eval_images=min_eval_images,
    )
    return split_scan(scan, config)


def split_scan(scan: DatasetScan, config: SplitConfig) -> SplitResult:
    """:func:`make_splits` for a ready :class:`SplitConfig`."""
    if not scan.items:
        raise InputError(f"no usable images in {scan.root} to split")
    grouping = _group_items(scan, config)
    class_index = np.array([scan.class_names.index(item.label) for item in scan.items])
    if config.mode == "random":
        log.warning(
            "--split-mode random puts every image on its own: duplicates and adjacent slices of one "
            "patient land in different splits, so validation/test scores are inflated (see the audit)"
        )
        split_of = _assign_random(class_index, len(scan.class_names), config.ratios, config.seed)
    else:
        per_group = _assign_grouped(grouping.group_of, class_index, grouping.targets, config.seed)
        split_of = per_group[grouping.group_of]
    rows = [
        SplitRow(item.path, item.label, SPLITS[s], grouping.names[g], item.sha256)
        for item, s, g in zip(scan.items, split_of, grouping.group_of, strict=True)
    ]
    return SplitResult(rows, leakage_audit(scan, rows, grouping, config))


# ----------------------------------------------------------------------------- audit


def leakage_audit(
    scan: DatasetScan, rows: list[SplitRow], grouping: _Grouping, config: SplitConfig
) -> dict[str, Any]:
    """Counts per split and class, the groups found and cut, every val/test image with a twin in
    train, and ``warnings``: each goal of the split that was missed, in words."""
    split_index = np.array([SPLITS.index(row.split) for row in rows])
    counts = {s: {c: 0 for c in scan.class_names} for s in SPLITS}
    for row in rows:
        counts[row.split][row.label] += 1
    totals = {c: sum(counts[s][c] for s in SPLITS) for c in scan.class_names}
    proportions = {
        c: {s: round(counts[s][c] / max(totals[c], 1), 4) for s in SPLITS} for c in scan.class_names
    }
    error = max(
        abs(proportions[c][s] - r)
        for c in scan.class_names
        for s, r in zip(SPLITS, config.ratios, strict=True)
    )
    train_hashes = {row.sha256 for row in rows if row.split == "train"}
    exact_twin = np.array([row.split != "train" and row.sha256 in train_hashes for row in rows])
    near_twin = np.zeros(len(rows), dtype=bool)
    for i, j in grouping.near_pairs:
        if split_index[i] == 0 and split_index[j] != 0:
            near_twin[j] = True
        elif split_index[j] == 0 and split_index[i] != 0:
            near_twin[i] = True
    near_twin &= ~exact_twin
    splits_per_group: dict[int, set[int]] = defaultdict(set)
    labels_per_group: dict[int, set[str]] = defaultdict(set)
    for g, s, row in zip(grouping.group_of, split_index, rows, strict=True):
        splits_per_group[int(g)].add(int(s))
        labels_per_group[int(g)].add(row.label)
    group_sizes = Counter(int(g) for g in grouping.group_of)
    conflicts = [p for p in scan.problems if p.reason.startswith("label conflict")]
    leak = {
        s: {
            "images": int((split_index == k).sum()),
            "exact_twin_in_train": int((exact_twin & (split_index == k)).sum()),
            "near_twin_in_train": int((near_twin & (split_index == k)).sum()),
        }
        for k, s in enumerate(SPLITS)
        if s != "train"
    }
    audit = {
        "mode": config.mode,
        "seed": config.seed,
        "ratios": list(config.ratios),
        "near_dup_distance": config.near_dup_distance,
        "series_distance": config.series_distance,
        "hash_bits": HASH_SIZE**2,
        "group_pattern": config.group_pattern,
        "dataset": str(scan.root),
        "n_images": len(rows),
        "class_names": list(scan.class_names),
        "counts": counts,
        "proportions": proportions,
        "max_proportion_error": round(error, 4),
        "groups": {
            "total": len(group_sizes),
            "with_several_images": sum(1 for n in group_sizes.values() if n > 1),
            "largest": max(group_sizes.values()),
            "largest_share": round(max(group_sizes.values()) / len(rows), 4),
            "crossing_splits": sum(1 for s in splits_per_group.values() if len(s) > 1),
            "with_mixed_labels": sum(1 for labels in labels_per_group.values() if len(labels) > 1),
        },
        "exact_duplicates": {"groups": grouping.exact_groups, "files": grouping.exact_files},
        "near_duplicates": {
            "groups": grouping.near_groups,
            "files": grouping.near_files,
            "hash_pairs": grouping.hash_pairs,
            "series_pairs": grouping.series_pairs,
        },
        "near_twin_means": "a perceptual-hash near duplicate, or a neighbouring file number that looks alike",
        "pattern_groups": grouping.pattern_groups,
        "group_cuts": {
            "max_group_share": config.max_group_share,
            "bound_images": grouping.bound,
            "proportion_tolerance": config.proportion_tolerance,
            "links_cut": grouping.links_cut,
            "groups_cut": grouping.groups_cut,
        },
        "min_eval_images": config.min_eval_images,
        "leak": leak,
        "leaked_images": sum(v["exact_twin_in_train"] + v["near_twin_in_train"] for v in leak.values()),
        "label_conflicts": {"files": len(conflicts), "paths": [str(p.path) for p in conflicts]},
        "scan_problems": [{"path": str(p.path), "reason": p.reason} for p in scan.problems],
    }
    oversized = {
        grouping.names[g]: (n, len({rows[i].sha256 for i in np.nonzero(grouping.group_of == g)[0]}) == 1)
        for g, n in group_sizes.items()
        if grouping.bound is not None and n > grouping.bound
    }
    held = np.array([[counts[s][c] for c in scan.class_names] for s in SPLITS])
    off_ratio = [scan.class_names[c] for c in grouping.targets.off_ratio(held)]
    audit["warnings"] = _audit_warnings(audit, off_ratio, oversized, config)
    return audit


def _audit_warnings(
    audit: dict[str, Any], off_ratio: list[str], oversized: dict[str, tuple[int, bool]], config: SplitConfig
) -> list[str]:
    """The goals of the split it missed: leaks, small val/test classes, proportions, large groups.

    ``off_ratio``: classes whose split shares miss the ratios by more than the tolerance (or one
    image). ``oversized``: group name -> (images, whether they are all byte-identical) for groups
    above the bound, which only an exact-duplicate set or a --group-pattern key can be.
    """
    warnings = []
    if audit["leaked_images"] and config.mode == "random":
        warnings.append(
            f"{audit['leaked_images']} validation/test images have a twin in train: their scores will be "
            "inflated (use --split-mode grouped)"
        )
    elif audit["leaked_images"]:  # grouped: exact copies never cross, so only cut links can
        warnings.append(
            f"{audit['leaked_images']} validation/test images have a near twin in train across a link cut "
            "to keep groups within bounds (a look-alike neighbour, possibly of the same patient)"
        )
    for name in audit["class_names"]:
        total = sum(audit["counts"][s][name] for s in SPLITS)
        for s, ratio in zip(SPLITS[1:], config.ratios[1:], strict=True):
            held = audit["counts"][s][name]
            if ratio > 0 and held < config.min_eval_images:
                why = (
                    f"the class has only {total}"
                    if ratio * total < config.min_eval_images
                    else "its groups could not be dealt finer"
                )
                warnings.append(
                    f"{s} holds {held} {name} image(s), fewer than --min-eval-images {config.min_eval_images} "
                    f"({why}); its {name} scores rest on very few images"
                )
    if config.mode == "grouped" and off_ratio:
        warnings.append(
            f"{', '.join(off_ratio)}: split shares off the ratios by more than --proportion-tolerance "
            f"{config.proportion_tolerance} (or one image), up to {audit['max_proportion_error']:.1%} "
            "(see proportions): groups too large to deal finer"
        )
    for group, (images, identical) in oversized.items():
        why = "byte-identical copies" if identical else "files sharing a --group-pattern key"
        warnings.append(
            f"group {group} holds {images} images ({images / audit['n_images']:.1%}), above the "
            f"{audit['group_cuts']['bound_images']}-image bound (--max-group-share): {why}, kept whole"
        )
    return warnings


# ----------------------------------------------------------------------------- splits.csv

_COLUMNS = ("path", "label", "split", "group", "sha256")


def write_splits(rows: Sequence[SplitRow], csv_path: str | Path) -> None:
    """Write the manifest atomically; paths relative to the CSV's folder when possible."""
    csv_path = Path(csv_path)
    base = csv_path.resolve().parent

    def location(path: Path) -> str:
        try:
            return Path(os.path.relpath(path, base)).as_posix()
        except ValueError:  # another drive on Windows
            return path.as_posix()

    records = [
        {"path": location(row.path), "label": row.label, "split": row.split, "group": row.group, "sha256": row.sha256}
        for row in rows
    ]
    atomic_write_csv(csv_path, records, _COLUMNS)


def read_splits(csv_path: str | Path) -> list[SplitRow]:
    """Read a splits.csv (relative paths resolve against its folder); InputError names missing files."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(
            f"splits file {csv_path} does not exist; make one with `kidney-edge split DATA --out {csv_path}`"
        )
    try:
        records = list(csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read splits file {csv_path}: {exc}") from None
    missing_columns = {"path", "label", "split"} - set(records[0] if records else {})
    if not records or missing_columns:
        raise InputError(f"{csv_path} is not a splits.csv: needs columns path,label,split,group (and rows)")
    base = csv_path.resolve().parent
    rows, missing = [], []
    for number, record in enumerate(records, start=2):
        if record["split"] not in SPLITS:
            raise InputError(
                f"{csv_path} line {number}: split must be one of {SPLITS}, got {record['split']!r}"
            )
        path = (base / record["path"]).resolve()
        if not path.is_file():
            missing.append(str(path))
        rows.append(
            SplitRow(
                path, record["label"], record["split"], record.get("group") or "", record.get("sha256") or ""
            )
        )
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"{csv_path}: {len(missing)} listed image(s) not found: {shown}")
    return rows


def audit_path(csv_path: str | Path) -> Path:
    """Where the audit of a splits.csv lives: ``splits.csv`` -> ``splits_audit.json``."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + AUDIT_SUFFIX)


def split_dataset(
    data_dir: str | Path,
    out_csv: str | Path,
    config: SplitConfig | None = None,
    *,
    progress: ProgressFn | None = None,
) -> SplitResult:
    """Scan ``data_dir``, split it under ``config`` (default: :class:`SplitConfig`'s defaults),
    write ``out_csv`` and ``<stem>_audit.json`` beside it."""
    scan = scan_dataset(data_dir, progress=progress)
    result = split_scan(scan, config or SplitConfig())
    write_splits(result.rows, out_csv)
    atomic_write_json(audit_path(out_csv), result.audit)
    log.info("wrote %s and %s", out_csv, audit_path(out_csv))
    return result


def data_fingerprint(rows: Sequence[SplitRow]) -> str:
    """sha256 over the sorted (content hash, label, split) triples: independent of where files live."""
    digest = hashlib.sha256()
    for sha, label, split in sorted((row.sha256, row.label, row.split) for row in rows):
        digest.update(f"{sha},{label},{split}\n".encode())
    return digest.hexdigest()
