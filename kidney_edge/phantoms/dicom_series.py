"""Phantom CT studies as real DICOM series, for series-level predict, evaluate and benchmarks.

:func:`synthesize_series` draws each phantom patient with the classic renderer
(:mod:`kidney_edge.phantoms.classic`, the one the demo's model is trained on) as one study
holding one axial CT series of consecutive slices. The patient's finding is a lesion with a
depth along z equal to its in-plane diameter, so only the slices whose plane cuts it show it;
stones, a few millimetres across, appear on one to three slices.

Each slice is a CT Image Storage file written with pydicom: 16-bit pixel data with
RescaleSlope 1 / RescaleIntercept -1024 (Hounsfield units), Study/Series/SOP Instance UIDs,
InstanceNumber (1 at the top, as scanners number them), ImagePositionPatient and
ImageOrientationPatient, PixelSpacing, SliceThickness and a phantom PatientID. The layout is a
PACS export's: ``OUT/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>``,
file names without suffixes. Beside them:

- ``series_truth.csv``: one row per series, its finding and the InstanceNumbers that show it;
- ``splits.csv``: one row per file in the splits.csv schema (path, label, split, group), the
  slice's own label (the finding where the slice cuts it, Normal elsewhere), series split into
  val and test, so ``kidney-edge evaluate MODEL OUT/splits.csv`` reads it unchanged.

``hu_scale`` says what the stored values are. ``display`` (default): the renderer's HU mapped
affinely so that ``window`` (the spec's CT window, which predict applies to CT) shows each slice
exactly as the classic phantom's own per-patient window shows its JPEGs, the images the demo's
model learned from. ``physical``: the renderer's HU as drawn, which that window shows with more
contrast than the training images had.

A few series carry what real exports have (``quirks``): a missing slice (a gap), a file sent
twice (a duplicate SOPInstanceUID) and two slices tagged with another orientation.
Deterministic for a seed.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import InputError
from kidney_edge.io_utils import atomic_write_csv
from kidney_edge.layout import SPLITS_FILE
from kidney_edge.phantoms import classic
from kidney_edge.phantoms.kaggle_layout import FINDINGS, NORMAL, PhantomConfig, ProgressFn, class_counts
from kidney_edge.spec import DEFAULT_CLASS_NAMES, CTWindow

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # ImageOrientationPatient: rows along +x, columns along +y
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
RESCALE_INTERCEPT = -1024.0  # stored 0 = -1024 HU, the usual CT convention
STORED_MAX = 4095  # 12 bits stored: -1024..3071 HU
SERIES_TRUTH_CSV = "series_truth.csv"
SPLITS_CSV = SPLITS_FILE  # the series phantom writes the manifest `split` and `train` read
# Easy enough for the demo's model: the series phantom is drawn at the demo phantom's difficulty.
DEFAULT_DIFFICULTY = classic.DEMO_DIFFICULTY
SLICES_PER_SERIES = (24, 40)  # 12-20 cm at 5 mm: both kidneys, findings on some slices only
SLICE_THICKNESS_MM = 5.0  # a routine abdominal reconstruction
FIELD_OF_VIEW_MM = 360.0  # 0.70 mm pixels at 512 px


class HuScale(str, Enum):
    """What a series phantom's stored Hounsfield units are (see the module docstring)."""

    DISPLAY = "display"
    PHYSICAL = "physical"


class Quirk(str, Enum):
    """What a real export may do to a series; the phantom writes one series of each."""

    GAP = "gap"  # one slice missing: positions jump by two thicknesses
    DUPLICATE = "duplicate"  # one file sent twice: two files, one SOPInstanceUID
    MIXED_ORIENTATION = "mixed_orientation"  # two slices tagged coronal inside the axial series


@dataclass(frozen=True)
class SeriesPhantomConfig:
    """Options of ``kidney-edge synth --format dicom``; messages name the CLI flags."""

    n_series: int = 40
    seed: int = 0
    size: int = 512
    difficulty: float = DEFAULT_DIFFICULTY
    slices_per_series: tuple[int, int] = SLICES_PER_SERIES
    class_mix: dict[str, float] | None = None
    hu_scale: HuScale = HuScale.DISPLAY
    window: CTWindow = field(default_factory=CTWindow)
    quirks: bool = True
    slice_thickness_mm: float = SLICE_THICKNESS_MM
    field_of_view_mm: float = FIELD_OF_VIEW_MM

    def __post_init__(self) -> None:
        object.__setattr__(self, "hu_scale", HuScale(self.hu_scale))
        object.__setattr__(self, "slices_per_series", tuple(int(v) for v in self.slices_per_series))
        if not 1 <= self.n_series <= 100_000:
            raise InputError(f"--n (series) must be in 1..100000, got {self.n_series}")
        low, high = self.slices_per_series
        if not 3 <= low <= high <= 512:
            raise InputError(
                f"--slices-per-patient must be MIN MAX with 3 <= MIN <= MAX <= 512 (got {low} {high})"
            )
        # The rest (size, difficulty, class mix) is checked as the Kaggle-layout phantoms check it.
        PhantomConfig(n=1, size=self.size, difficulty=self.difficulty, class_mix=self.class_mix)

    @property
    def pixel_spacing_mm(self) -> float:
        return self.field_of_view_mm / self.size


@dataclass(frozen=True)
class SliceHeader:
    """The identity and geometry of one DICOM slice, as :func:`slice_dataset` writes them."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    instance: int
    position: tuple[float, float, float]  # ImagePositionPatient, mm: centre of the first pixel
    orientation: tuple[float, ...] = AXIAL
    pixel_spacing: tuple[float, float] = (FIELD_OF_VIEW_MM / 512, FIELD_OF_VIEW_MM / 512)  # row, column
    thickness: float = SLICE_THICKNESS_MM
    modality: str = "CT"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    series_number: int = 1
    description: str = "phantom abdomen"
    window: CTWindow = field(default_factory=CTWindow)
    frame_uid: str = ""  # FrameOfReferenceUID; none written when empty


def slice_dataset(hu: np.ndarray, header: SliceHeader) -> Any:  # -> pydicom.Dataset
    """A (rows, columns) array of Hounsfield units as a CT (or, by ``modality``, MR) DICOM dataset."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_class = CT_IMAGE_STORAGE if header.modality == "CT" else MR_IMAGE_STORAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, header.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, header.sop_uid
    ds.PatientID, ds.PatientName = header.patient_id, f"Phantom^{header.patient_id}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = header.study_uid, header.series_uid
    if header.frame_uid:
        ds.FrameOfReferenceUID = header.frame_uid
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", header.series_number, header.instance
    ds.Modality, ds.ImageType = header.modality, list(header.image_type)
    ds.SeriesDescription, ds.BodyPartExamined = header.description, "ABDOMEN"
    ds.StudyDate = ds.SeriesDate = "20260101"
    ds.ImagePositionPatient = [round(v, 4) for v in header.position]
    ds.ImageOrientationPatient = [round(v, 6) for v in header.orientation]
    ds.SliceLocation = round(header.position[2], 4)
    ds.PixelSpacing = [round(v, 6) for v in header.pixel_spacing]
    ds.SliceThickness = header.thickness
    ds.WindowCenter, ds.WindowWidth = header.window.level, header.window.width
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, RESCALE_INTERCEPT, "HU"
    stored = np.clip(np.rint(np.asarray(hu, np.float64) - RESCALE_INTERCEPT), 0, STORED_MAX)
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def write_slice(path: str | Path, hu: np.ndarray, header: SliceHeader) -> Path:
    """:func:`slice_dataset` saved as a DICOM Part 10 file at ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    slice_dataset(hu, header).save_as(path, enforce_file_format=True)
    return path


def display_matched_hu(hu: np.ndarray, shown: tuple[float, float], window: CTWindow) -> np.ndarray:
    """HU mapped affinely so that ``window`` shows what the (level, width) window ``shown`` shows."""
    level, width = shown
    return (window.level - window.width / 2) + (hu - (level - width / 2)) * (window.width / width)


# ----------------------------------------------------------------------------- one series


@dataclass(frozen=True)
class _SeriesPlan:
    index: int
    patient_id: str
    class_name: str
    split: str
    quirk: Quirk | None


@dataclass
class _SeriesResult:
    truth: dict[str, object]
    slices: list[dict[str, object]]


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["kidney-edge-phantom", str(seed), *map(str, parts)])


def _lesion_span(lesion: classic.Lesion, n_slices: int, config: SeriesPhantomConfig,
                 rng: np.random.Generator) -> tuple[float, float]:  # fmt: skip
    """(centre, half-depth) of the lesion in slice units: as deep as it is wide, centred on a
    slice in the middle third, so at least the nearest slice cuts it."""
    radius_mm = lesion.radius * config.field_of_view_mm / classic.REF  # posed radius, px at 512
    half = max(0.5, radius_mm / config.slice_thickness_mm)
    centre = round(rng.uniform(0.35, 0.65) * (n_slices - 1)) + rng.uniform(-0.4, 0.4) * min(1.0, half)
    return float(centre), float(half)


def _render_series(
    plan: _SeriesPlan, config: SeriesPhantomConfig, noise_bank: np.ndarray, out: Path
) -> _SeriesResult:
    rng = np.random.default_rng([config.seed, 11, plan.index])
    finding = FINDINGS[plan.class_name]
    patient, lesion = classic.draw_patient(rng, config.size, config.difficulty, finding)
    low, high = config.slices_per_series
    n_slices = int(rng.integers(low, high + 1))
    centre, half = _lesion_span(lesion, n_slices, config, rng) if finding != "none" else (0.0, 1.0)
    study_uid, series_uid = (
        _uid(config.seed, plan.patient_id, "study"),
        _uid(config.seed, plan.patient_id, "series"),
    )
    folder = Path(plan.patient_id) / study_uid / series_uid
    spacing = config.pixel_spacing_mm
    corner = -config.field_of_view_mm / 2 + spacing / 2
    top_z = (n_slices - 1) * config.slice_thickness_mm / 2
    skipped, coronal = _quirk_slices(plan.quirk, n_slices, centre, half, rng)
    slices, finding_instances = [], []
    for i in range(n_slices):  # i = 0 is the top slice: InstanceNumber 1, highest z
        depth = (i - centre) / half if finding != "none" else 2.0
        cuts = abs(depth) < 1.0
        hu, _ = classic.slice_hu(patient, lesion if cuts else classic.NO_LESION, rng, noise_bank, depth)
        shown = classic.display_window(patient, rng)
        if i in skipped:
            continue
        if config.hu_scale is HuScale.DISPLAY:
            hu = display_matched_hu(hu, shown, config.window)
        header = SliceHeader(
            patient_id=plan.patient_id,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=_uid(config.seed, plan.patient_id, "slice", i),
            instance=i + 1,
            position=(corner, corner, top_z - i * config.slice_thickness_mm),
            orientation=CORONAL if i in coronal else AXIAL,
            pixel_spacing=(spacing, spacing),
            thickness=config.slice_thickness_mm,
            window=config.window,
            frame_uid=_uid(config.seed, plan.patient_id, "frame"),
        )
        label = plan.class_name if cuts else NORMAL
        if cuts:
            finding_instances.append(i + 1)
        names = [header.sop_uid]
        if plan.quirk is Quirk.DUPLICATE and i == n_slices // 2:
            names.append(_uid(config.seed, plan.patient_id, "resent", i))  # same SOP UID, 2nd file
        for name in names:
            write_slice(out / folder / name, hu, header)
            slices.append({"path": (folder / name).as_posix(), "label": label, "split": plan.split,
                           "group": series_uid, "instance": i + 1, "z_mm": round(header.position[2], 3),
                           "lesion_depth": round(depth, 3) if cuts else ""})  # fmt: skip
    truth = {
        "patient_id": plan.patient_id,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "folder": folder.as_posix(),
        "label": plan.class_name,
        "finding": finding,
        "n_slices": n_slices - len(skipped),
        "finding_instances": instance_ranges(finding_instances),
        "split": plan.split,
        "quirk": plan.quirk.value if plan.quirk else "",
        "quirk_instances": instance_ranges(sorted({i + 1 for i in (*skipped, *coronal)}))
        or (str(n_slices // 2 + 1) if plan.quirk is Quirk.DUPLICATE else ""),
        "kidney_side": lesion.side,
        "lesion_radius_mm": round(lesion.radius * config.field_of_view_mm / classic.REF, 1)
        if lesion.radius
        else "",
        "phase": patient.phase,
        "hu_scale": config.hu_scale.value,
        "difficulty": config.difficulty,
    }
    return _SeriesResult(truth, slices)


def _quirk_slices(
    quirk: Quirk | None, n_slices: int, centre: float, half: float, rng: np.random.Generator
) -> tuple[set[int], set[int]]:
    """(slices left out, slices tagged coronal): away from the lesion, so the finding stays visible."""
    far = [i for i in range(1, n_slices - 1) if abs(i - centre) > half + 1] or [n_slices - 2]
    if quirk is Quirk.GAP:
        return {int(rng.choice(far))}, set()
    if quirk is Quirk.MIXED_ORIENTATION:
        return set(), {n_slices - 2, n_slices - 1} if centre < n_slices / 2 else {0, 1}
    return set(), set()


def instance_ranges(instances: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> "3-5;9" (sorted InstanceNumbers as compact ranges)."""
    parts, run = [], []
    for number in sorted(instances):
        if run and number != run[-1] + 1:
            parts.append(_range_text(run))
            run = []
        run.append(number)
    if run:
        parts.append(_range_text(run))
    return ";".join(parts)


def _range_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def parse_instance_ranges(text: str) -> list[int]:
    """Inverse of :func:`instance_ranges`."""
    numbers: list[int] = []
    for part in filter(None, text.split(";")):
        first, _, last = part.partition("-")
        numbers.extend(range(int(first), int(last or first) + 1))
    return numbers


# ----------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class SeriesPhantomSummary:
    """What :func:`synthesize_series` wrote."""

    out_dir: Path
    class_counts: dict[str, int]  # series per class
    n_series: int
    n_files: int
    quirks: dict[str, str]  # quirk -> series UID
    truth_csv: Path
    splits_csv: Path


_TRUTH_COLUMNS = (
    "patient_id", "study_uid", "series_uid", "folder", "label", "finding", "n_slices",
    "finding_instances", "split", "quirk", "quirk_instances", "kidney_side", "lesion_radius_mm",
    "phase", "hu_scale", "difficulty",
)  # fmt: skip
_SLICE_COLUMNS = ("path", "label", "split", "group", "instance", "z_mm", "lesion_depth")


def _plan(config: SeriesPhantomConfig) -> list[_SeriesPlan]:
    """Series in an interleaved class order; val/test alternate within each class; one quirk each."""
    counts = class_counts(config.n_series, config.class_mix)
    names = [name for name in DEFAULT_CLASS_NAMES for _ in range(counts.get(name, 0))]
    rng = np.random.default_rng([config.seed, 13])
    order = rng.permutation(len(names))
    quirk_at: dict[int, Quirk] = {}
    if config.quirks and len(names) >= 2 * len(Quirk):
        chosen = rng.choice(len(names), size=len(Quirk), replace=False)
        quirk_at = {int(index): quirk for index, quirk in zip(chosen, Quirk, strict=True)}
    seen: dict[str, int] = {}
    plans = []
    for index, position in enumerate(order):
        name = names[int(position)]
        seen[name] = seen.get(name, 0) + 1
        split = "val" if seen[name] % 2 == 1 else "test"
        plans.append(_SeriesPlan(index, f"PH{index + 1:05d}", name, split, quirk_at.get(index)))
    return plans


def synthesize_series(
    out_dir: str | Path,
    config: SeriesPhantomConfig | None = None,
    *,
    progress: ProgressFn | None = None,
) -> SeriesPhantomSummary:
    """Write ``config.n_series`` phantom CT series to ``out_dir``; see the module docstring.

    ``progress(done, total)`` is called after every series. A previous series phantom in
    ``out_dir`` is replaced (only the files its splits.csv lists are removed); any other
    non-empty folder is refused.
    """
    config = config or SeriesPhantomConfig()
    _import_pydicom()
    out = Path(out_dir)
    _clear_previous(out)
    plans = _plan(config)
    noise_bank = classic.noise_bank(np.random.default_rng([config.seed, 7]), config.size)
    truths, slices = [], []
    for done, plan in enumerate(plans, start=1):
        result = _render_series(plan, config, noise_bank, out)
        truths.append(result.truth)
        slices.extend(result.slices)
        if progress is not None:
            progress(done, len(plans))
    truth_csv, splits_csv = out / SERIES_TRUTH_CSV, out / SPLITS_CSV
    atomic_write_csv(splits_csv, slices, _SLICE_COLUMNS)
    atomic_write_csv(truth_csv, truths, _TRUTH_COLUMNS)
    counts = {name: sum(p.class_name == name for p in plans) for name in DEFAULT_CLASS_NAMES}
    quirks = {str(t["quirk"]): str(t["series_uid"]) for t in truths if t["quirk"]}
    log.info("wrote %d phantom series (%d files) to %s", len(plans), len(slices), out)
    return SeriesPhantomSummary(out, counts, len(plans), len(slices), quirks, truth_csv, splits_csv)


def _import_pydicom() -> None:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise InputError("writing DICOM needs pydicom: pip install 'kidney-edge[dicom]'") from None


def _clear_previous(out: Path) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    splits = out / SPLITS_CSV
    if not (out / SERIES_TRUTH_CSV).is_file() or not splits.is_file():
        raise InputError(f"{out} is not empty and holds no DICOM series phantom; pass a new or empty folder")
    with open(splits, newline="", encoding="utf-8") as handle:
        folders = set()
        for row in csv.DictReader(handle):
            path = out / row["path"]
            path.unlink(missing_ok=True)
            folders.update(p for p in path.parents if p != out and out in p.parents)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for name in (SERIES_TRUTH_CSV, SPLITS_CSV):
        (out / name).unlink(missing_ok=True)


def read_series_truth(folder: str | Path) -> list[dict[str, str]]:
    """The rows of ``folder``'s series_truth.csv (InputError when there is none)."""
    path = Path(folder) / SERIES_TRUTH_CSV
    if not path.is_file():
        raise InputError(
            f"{path} does not exist: make a series phantom with `kidney-edge synth OUT --format dicom`"
        )
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


__all__ = [
    "AXIAL",
    "CORONAL",
    "HuScale",
    "Quirk",
    "SeriesPhantomConfig",
    "SeriesPhantomSummary",
    "SliceHeader",
    "display_matched_hu",
    "instance_ranges",
    "parse_instance_ranges",
    "read_series_truth",
    "slice_dataset",
    "synthesize_series",
    "write_slice",
]
