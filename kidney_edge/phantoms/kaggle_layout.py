"""The Kaggle "CT KIDNEY DATASET" layout, and the one writer of it that slice renderers call.

The layout: ``OUT/<Class>/<Class>- (k).jpg``, ``OUT/kidneyData.csv`` with the real dataset's
columns (image_id, path, diag, target, Class) and, for phantoms only, ``OUT/phantom_truth.csv``,
the ground truth the real data lacks (patient, slice, finding, lesion, ...). :mod:`kidney_edge.dataset`
reads the layout with these names; the renderers (:mod:`~kidney_edge.phantoms.classic`,
:mod:`~kidney_edge.phantoms.lookalike`) write it through :func:`write_phantom`.

:func:`write_phantom` owns plan -> render -> copies -> rows -> CSV: per class it plans the
patients (how many adjacent slices each) and the byte copies (a few percent of files filed
again under another number, as in the real dataset, so a random split leaks), asks the renderer
for each patient's slices, writes each slice under every number the plan gives it and writes
both CSV files at the end. A renderer only draws, and fills the finding columns and its own
truth columns.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import numpy as np

from kidney_edge.errors import InputError
from kidney_edge.io_utils import atomic_write_csv
from kidney_edge.spec import DEFAULT_CLASS_NAMES

log = logging.getLogger(__name__)

LABELS_CSV = "kidneyData.csv"  # the Kaggle dataset's label file
LABEL_COLUMNS = ("image_id", "path", "diag", "target", "Class")  # kidneyData.csv, as on Kaggle
TRUTH_CSV = "phantom_truth.csv"  # a phantom's ground truth, beside the class folders
# phantom_truth.csv: the writer fills the file's identity around the finding columns, which
# every renderer fills; a renderer's own columns follow these.
FINDING_COLUMNS = (
    "finding", "kidney_side", "lesion_x", "lesion_y", "lesion_radius_px", "lesion_contrast_hu", "phase",
)  # fmt: skip
TRUTH_COLUMNS = ("path", "class", "patient", "slice", *FINDING_COLUMNS, "duplicate_of", "difficulty")

CYST, NORMAL, STONE, TUMOR = DEFAULT_CLASS_NAMES  # the Kaggle dataset's class folders
# Class sizes of the public Kaggle dataset (12,446 images).
KAGGLE_CLASS_COUNTS = {NORMAL: 5077, CYST: 3709, TUMOR: 2283, STONE: 1377}
FINDINGS = {NORMAL: "none", CYST: "cyst", STONE: "stone", TUMOR: "tumor"}
# The renderers' one dial; higher means smaller, fainter findings and more noise.
DEFAULT_DIFFICULTY = 1.0
DUPLICATE_FRACTION = 0.03  # share of files that are byte copies of another file of the class
SLICES_PER_PATIENT = (2, 8)  # inclusive range of adjacent slices per patient, unless a renderer says

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class PhantomSummary:
    """What :func:`write_phantom` wrote."""

    out_dir: Path
    class_counts: dict[str, int]
    n_images: int
    n_patients: int
    n_duplicates: int
    labels_csv: Path
    truth_csv: Path


@dataclass(frozen=True)
class PhantomConfig:
    """Options of ``kidney-edge synth``; validated so messages name the CLI flag."""

    n: int = sum(KAGGLE_CLASS_COUNTS.values())
    seed: int = 0
    size: int = 512
    difficulty: float = DEFAULT_DIFFICULTY
    class_mix: dict[str, float] | None = None
    duplicate_fraction: float = DUPLICATE_FRACTION
    slices_per_patient: tuple[int, int] = SLICES_PER_PATIENT

    def __post_init__(self) -> None:
        if self.n < 1:
            raise InputError(f"--n must be at least 1 (got {self.n})")
        if not 32 <= self.size <= 2048:
            raise InputError(f"--size must be between 32 and 2048 pixels (got {self.size})")
        if not 0.25 <= self.difficulty <= 4.0:
            raise InputError(f"--difficulty must be between 0.25 and 4 (got {self.difficulty})")
        if not 0.0 <= self.duplicate_fraction < 0.5:
            raise InputError(f"duplicate fraction must be in [0, 0.5) (got {self.duplicate_fraction})")
        low, high = self.slices_per_patient
        if not 1 <= low <= high <= 64:
            raise InputError(
                f"--slices-per-patient must be MIN MAX with 1 <= MIN <= MAX <= 64 (got {low} {high})"
            )
        mix = self.class_mix or {}
        unknown = set(mix) - set(DEFAULT_CLASS_NAMES)
        if unknown or any(v < 0 for v in mix.values()) or (mix and sum(mix.values()) <= 0):
            raise InputError(
                f"class mix must give non-negative weights for {list(DEFAULT_CLASS_NAMES)} (got {mix})"
            )


def class_counts(n: int, class_mix: dict[str, float] | None = None) -> dict[str, int]:
    """Split ``n`` images over the classes in proportion to ``class_mix`` (default: Kaggle's)."""
    mix = class_mix or KAGGLE_CLASS_COUNTS
    names = [c for c in DEFAULT_CLASS_NAMES if mix.get(c, 0) > 0]
    total = sum(mix[c] for c in names)
    exact = {c: n * mix[c] / total for c in names}
    counts = {c: int(exact[c]) for c in names}
    # Largest remainder, so the counts add up to n exactly.
    for c in sorted(names, key=lambda c: counts[c] - exact[c])[: n - sum(counts.values())]:
        counts[c] += 1
    return {c: counts[c] for c in names if counts[c] > 0}


def file_name(class_name: str, number: int) -> str:
    """The Kaggle dataset's file naming: ``Cyst- (12).jpg``."""
    return f"{class_name}- ({number}).jpg"


# ----------------------------------------------------------------------------- planning

RunsFn = Callable[[int, int, int, np.random.Generator], list[int]]


def uniform_runs(total: int, low: int, high: int, rng: np.random.Generator) -> list[int]:
    """``total`` slices as patients of ``low``-``high`` slices drawn uniformly; the last is cut short."""
    slices: list[int] = []
    while sum(slices) < total:
        slices.append(int(min(rng.integers(low, high + 1), total - sum(slices))))
    return slices


def balanced_runs(total: int, low: int, high: int, rng: np.random.Generator) -> list[int]:
    """``total`` slices as patients of ``low``-``high`` slices each (fewer only if total < low)."""
    if total <= high:
        return [total]
    fewest, most = math.ceil(total / high), max(1, total // low)
    count = min(max(int(round(total / rng.uniform(low, high))), fewest), max(most, fewest))
    sizes = [min(low, total // count)] * count
    for _ in range(total - sum(sizes)):
        open_ = [i for i, s in enumerate(sizes) if s < high] or list(range(count))
        sizes[int(rng.choice(open_))] += 1
    return sizes


class CopyNumbering(str, Enum):
    """Which of a slice's files is the original that the others are recorded as copies of.

    The files are byte-identical, so both are true; they differ in where the original sits.
    """

    LOWEST = "lowest"  # the lowest number, even when that is a copy filed before the run
    IN_RUN = "in_run"  # the file in its patient's run of consecutive numbers


@dataclass(frozen=True)
class Planning:
    """How a renderer cuts a class into patients and numbers the byte copies."""

    runs: RunsFn
    numbering: CopyNumbering


@dataclass(frozen=True)
class ClassPlan:
    """Which patient slice each file number of one class shows (copies share a slice)."""

    name: str
    slices_per_patient: list[int]
    numbers: dict[tuple[int, int], list[int]]  # (patient, slice) -> file numbers, the original first


def plan_class(
    name: str, count: int, config: PhantomConfig, planning: Planning, rng: np.random.Generator
) -> ClassPlan:
    """Patients of consecutive file numbers; byte copies filed under numbers in between."""
    n_copies = min(int(round(count * config.duplicate_fraction)), count - 1)
    slices = planning.runs(count - n_copies, *config.slices_per_patient, rng)
    order = [(p, s) for p, n_s in enumerate(slices) for s in range(n_s)]
    sequence = [(key, False) for key in order]
    for index in rng.choice(len(order), size=n_copies, replace=n_copies > len(order)):
        sequence.insert(int(rng.integers(0, len(sequence) + 1)), (order[int(index)], True))
    numbers: dict[tuple[int, int], list[int]] = {key: [] for key in order}
    in_run = planning.numbering is CopyNumbering.IN_RUN
    for number, (key, is_copy) in enumerate(sequence, start=1):
        numbers[key].insert(0 if in_run and not is_copy else len(numbers[key]), number)
    return ClassPlan(name, slices, numbers)


# ----------------------------------------------------------------------------- the writer


@dataclass(frozen=True)
class DrawnSlice:
    """One slice as a renderer hands it to the writer."""

    data: bytes  # the encoded file, written under every number of the slice
    truth: Mapping[str, object]  # FINDING_COLUMNS and the renderer's own truth columns


class SliceRenderer(Protocol):
    """What :func:`write_phantom` needs of a renderer (built once per dataset, from its config)."""

    patient_prefix: str  # patient IDs are the prefix and a running number: "P00012"
    own_truth_columns: tuple[str, ...]  # after TRUTH_COLUMNS in phantom_truth.csv
    planning: Planning
    plan_rng: np.random.Generator  # draws every class's plan, class after class

    def draw_slices(self, class_index: int, name: str, patient: int, n_slices: int) -> Iterator[DrawnSlice]:
        """Patient number ``patient`` (0-based within the class) as ``n_slices`` adjacent slices."""
        ...


@dataclass
class _Tables:
    """The rows of both CSV files and the counters, as the writer fills them."""

    labels: list[dict[str, object]]
    truth: list[dict[str, object]]
    n_patients: int = 0

    def add(self, rel: str, class_index: int, truth: dict[str, object]) -> None:
        name = DEFAULT_CLASS_NAMES[class_index]
        # kidneyData.csv as in the Kaggle dataset: target is the index in sorted class order.
        values = (Path(rel).stem, rel, name, class_index, name)  # image_id, path, diag, target, Class
        self.labels.append(dict(zip(LABEL_COLUMNS, values, strict=True)))
        self.truth.append(truth)


def write_phantom(
    out_dir: str | Path,
    config: PhantomConfig,
    make_renderer: Callable[[PhantomConfig], SliceRenderer],
    progress: ProgressFn | None = None,
) -> PhantomSummary:
    """Write ``config.n`` slices of ``make_renderer(config)`` to ``out_dir`` in the Kaggle layout.

    ``progress(done, total)`` is called after every file. A previous phantom in ``out_dir`` is
    replaced (only the files its phantom_truth.csv lists are removed); any other non-empty
    folder is refused before anything is drawn.
    """
    out = Path(out_dir)
    clear_previous_phantom(out)
    counts = class_counts(config.n, config.class_mix)
    renderer = make_renderer(config)
    drawn_columns = {*FINDING_COLUMNS, *renderer.own_truth_columns}  # what a renderer fills
    tables = _Tables([], [])
    for class_index, name in enumerate(DEFAULT_CLASS_NAMES):
        if name not in counts:
            continue
        plan = plan_class(name, counts[name], config, renderer.planning, renderer.plan_rng)
        (out / name).mkdir(parents=True, exist_ok=True)
        for p, n_slices in enumerate(plan.slices_per_patient):
            tables.n_patients += 1
            patient_id = f"{renderer.patient_prefix}{tables.n_patients:05d}"
            for s, drawn in enumerate(renderer.draw_slices(class_index, name, p, n_slices)):
                assert set(drawn.truth) == drawn_columns, sorted(drawn.truth)
                for rel, original in _files(name, plan.numbers[(p, s)]):
                    (out / rel).write_bytes(drawn.data)
                    identity = {"path": rel, "class": name, "patient": patient_id, "slice": s}
                    tables.add(rel, class_index, {**identity, **drawn.truth, "duplicate_of": original,
                                                  "difficulty": config.difficulty})  # fmt: skip
                    if progress is not None:
                        progress(len(tables.truth), config.n)
    return _write_tables(out, counts, tables, (*TRUTH_COLUMNS, *renderer.own_truth_columns))


def _files(name: str, numbers: list[int]) -> list[tuple[str, str]]:
    """(path, path of the original or "") of each file of one slice; ``numbers[0]`` is the original."""
    paths = [f"{name}/{file_name(name, number)}" for number in numbers]
    return [(path, paths[0] if i else "") for i, path in enumerate(paths)]


def _write_tables(
    out: Path, counts: dict[str, int], tables: _Tables, truth_columns: tuple[str, ...]
) -> PhantomSummary:
    labels_csv, truth_csv = out / LABELS_CSV, out / TRUTH_CSV
    atomic_write_csv(truth_csv, tables.truth, truth_columns)
    atomic_write_csv(labels_csv, tables.labels, LABEL_COLUMNS)
    n_duplicates = sum(1 for row in tables.truth if row["duplicate_of"])
    log.info("wrote %d phantom slices of %d patients to %s", len(tables.truth), tables.n_patients, out)
    return PhantomSummary(
        out, counts, len(tables.truth), tables.n_patients, n_duplicates, labels_csv, truth_csv
    )


def clear_previous_phantom(out: Path) -> None:
    """Remove the phantom a previous run left in ``out``; refuse a non-empty folder that holds none."""
    if not out.exists() or not any(out.iterdir()):
        return
    truth = out / TRUTH_CSV
    if not truth.is_file():
        raise InputError(f"{out} is not empty and holds no phantom dataset; pass a new or empty folder")
    with open(truth, newline="") as handle:
        for row in csv.DictReader(handle):
            (out / row["path"]).unlink(missing_ok=True)
    for name in (LABELS_CSV, TRUTH_CSV):
        (out / name).unlink(missing_ok=True)
