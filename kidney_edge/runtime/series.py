"""Series-level results for DICOM studies: slices grouped into series, one row per series.

A CT study arrives as series of slices that share a StudyInstanceUID and a SeriesInstanceUID.
After predict has written one row per slice, the predict driver (or :func:`write_series`, for
any predictions file) reads that file back and the slices' DICOM headers (``stop_before_pixels``: no pixel is decoded twice), groups the
rows by study -> series, orders each series along its slice normal (ImagePositionPatient
projected on the cross product of ImageOrientationPatient's row and column directions;
InstanceNumber when positions are missing), aggregates the slice probabilities and writes one
row per series, atomically, beside the predictions. A post-pass over the finished file keeps
``predict --resume`` working unchanged.

Series scores (:meth:`SeriesRule.scores`): each finding class (every class but
``normal_class``) scores the aggregation (:data:`AGGREGATIONS`) of its slice probabilities;
``normal_class`` scores 1 - the highest finding score, so a series is normal exactly when no
finding is. The series label is a :class:`~kidney_edge.spec.DecisionRule` applied to those
scores, as the slice label is to slice probabilities: argmax names the strongest finding once it
scores 0.5, and a threshold rule for the positive class is chosen on validation series the way
the slice rule is chosen on validation slices (:mod:`kidney_edge.series_eval`).

A bad series never crashes the pass and is never merged silently: it gets a row whose
``warning`` (aggregated, with what was left out and why) or ``error`` (not aggregated) says
what is wrong: mixed modalities or a non-CT series, localizer images, slices in another
orientation or with another pixel spacing, missing position tags, a series of one slice, slices
that could not be decoded (e.g. a compressed transfer syntax without a decoder), duplicate
SOPInstanceUIDs, gaps and repeated positions along z.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import InputError, enum_choice
from kidney_edge.imaging import SUPPORTED_SUFFIXES, is_dicom_file
from kidney_edge.io_utils import atomic_write_text, csv_text
from kidney_edge.runtime.rows import (
    DEFAULT_PREDICTIONS_FILE,
    FLOAT_DIGITS,
    is_failed,
    is_unknown,
    probability_column,
    row_probabilities,
)
from kidney_edge.spec import DEFAULT_CLASS_NAMES, DEFAULT_POSITIVE_CLASS, UNKNOWN_LABEL, DecisionRule

log = logging.getLogger(__name__)

# The Kaggle dataset's no-finding class: its series score is "no finding scored".
NORMAL_CLASS = DEFAULT_CLASS_NAMES[1]
CT_MODALITY = "CT"
LOCALIZER = "LOCALIZER"  # ImageType value of scout / topogram images
SERIES_STEM = "series"
# Two directions or spacings within these are the same (header values are rounded decimals).
_ORIENTATION_TOLERANCE = 1e-3
_SPACING_TOLERANCE_MM = 1e-3
_SAME_POSITION_MM = 1e-2  # two slices closer than this along the normal share a position
_GAP_FACTOR = 1.5  # a step this many times the typical spacing is a gap
_HEADER_TAGS = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "Modality", "ImageType",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber",
)  # fmt: skip


# --------------------------------------------------------------------------- aggregation


class Aggregation(str, Enum):
    """How a series' slice probabilities become one score per class (``--aggregate``)."""

    MAX = "max"  # the most suspicious slice (RSNA 2023 abdominal-trauma winners)
    MEAN = "mean"  # every slice alike
    TOPK = "topk"  # mean of the k most suspicious slices (--top-k)
    NOISY_OR = "noisy-or"  # 1 - prod(1 - p): any slice positive (DSB 2017 winner, over its top candidates)


Aggregator = Callable[[np.ndarray, int], np.ndarray]  # ((S, C) probabilities, top_k) -> (C,)
AGGREGATIONS: dict[Aggregation, Aggregator] = {}


def register_aggregation(name: Aggregation) -> Callable[[Aggregator], Aggregator]:
    """Add an aggregator under ``name``; a second one under the same name is an error."""

    def add(function: Aggregator) -> Aggregator:
        if name in AGGREGATIONS:
            raise ValueError(f"aggregation {name.value!r} is already registered")
        AGGREGATIONS[name] = function
        return function

    return add


@register_aggregation(Aggregation.MAX)
def _max(probabilities: np.ndarray, top_k: int) -> np.ndarray:
    return probabilities.max(axis=0)


@register_aggregation(Aggregation.MEAN)
def _mean(probabilities: np.ndarray, top_k: int) -> np.ndarray:
    return probabilities.mean(axis=0)


@register_aggregation(Aggregation.TOPK)
def _top_k_mean(probabilities: np.ndarray, top_k: int) -> np.ndarray:
    k = min(top_k, len(probabilities))
    return np.sort(probabilities, axis=0)[-k:].mean(axis=0)


@register_aggregation(Aggregation.NOISY_OR)
def _noisy_or(probabilities: np.ndarray, top_k: int) -> np.ndarray:
    return 1.0 - np.prod(1.0 - probabilities, axis=0)


def aggregate(probabilities: np.ndarray, how: Aggregation | str, top_k: int = 1) -> np.ndarray:
    """(S, C) slice probabilities -> (C,) float64 series scores under ``how``."""
    how = enum_choice(Aggregation, how, "--aggregate")
    values = np.asarray(probabilities, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0:
        raise InputError(f"aggregation needs (slices, classes) probabilities, got shape {values.shape}")
    return AGGREGATIONS[how](values, top_k)


# Chosen on validation phantom series (benchmarks/results/series.md): mean loses findings seen
# on a few slices, noisy-OR over-calls; max, top-2 and top-3 are within one series, top-3 ahead
# on validation, and it does not call a finding from one stray slice.
DEFAULT_AGGREGATION = Aggregation.TOPK
DEFAULT_TOP_K = 3


@dataclass(frozen=True)
class SeriesRule:
    """How slice probabilities become a series label: an aggregation, then a decision rule.

    ``decision`` is applied to the series scores (:meth:`scores`); its threshold, when it has
    one, is an operating point chosen on validation series, not the slice rule's.
    """

    aggregate: Aggregation = DEFAULT_AGGREGATION
    top_k: int = DEFAULT_TOP_K
    decision: DecisionRule = field(default_factory=DecisionRule)
    normal_class: str = NORMAL_CLASS

    def __post_init__(self) -> None:
        object.__setattr__(self, "aggregate", enum_choice(Aggregation, self.aggregate, "--aggregate"))
        if not 1 <= int(self.top_k) <= 10_000:
            raise InputError(f"--top-k must be in 1..10000, got {self.top_k}")
        if isinstance(self.decision, dict):
            object.__setattr__(self, "decision", DecisionRule(**self.decision))

    def describe(self) -> str:
        how = f"top-{self.top_k} mean" if self.aggregate is Aggregation.TOPK else self.aggregate.value
        return f"{how} of slice probabilities; {self.decision.describe()}"

    @property
    def aggregate_label(self) -> str:
        """The aggregation as series rows name it: ``max``, ``topk(k=3)``."""
        if self.aggregate is Aggregation.TOPK:
            return f"{self.aggregate.value}(k={self.top_k})"
        return self.aggregate.value

    def scores(self, probabilities: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """(S, C) slice probabilities -> (C,) series scores (see the module docstring)."""
        scores = aggregate(probabilities, self.aggregate, self.top_k)
        if self.normal_class in class_names and len(class_names) > 1:
            normal = list(class_names).index(self.normal_class)
            findings = np.delete(scores, normal)
            scores[normal] = 1.0 - findings.max()
        return scores

    def decide(self, scores: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """(N, C) series scores -> (N,) class indices. Scores are compared in float32, the precision
        an operating point is chosen in (:func:`kidney_edge.metrics.tumor_decision_rule`)."""
        return self.decision.decide(np.asarray(scores, dtype=np.float32), tuple(class_names))

    def to_dict(self) -> dict[str, Any]:
        return {
            "aggregate": self.aggregate.value,
            "top_k": int(self.top_k),
            "normal_class": self.normal_class,
            "decision": {
                "kind": self.decision.kind,
                "positive_class": self.decision.positive_class,
                "threshold": self.decision.threshold,
                "target_recall": self.decision.target_recall,
                "note": self.decision.note,
            },
            "description": self.describe(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeriesRule:
        values = {key: data[key] for key in ("aggregate", "top_k", "decision", "normal_class") if key in data}
        try:
            return cls(**values)
        except TypeError as exc:
            raise InputError(f"invalid series rule: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SeriesRule:
        """A rule saved as JSON (``to_dict``), e.g. the one chosen on validation series."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read the series rule {path}: {exc}") from None


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class DicomHeader:
    """What grouping and ordering need from one file's header; ``error`` when it cannot be read."""

    path: str
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    patient_id: str = ""
    modality: str = ""
    image_type: tuple[str, ...] = ()
    position: tuple[float, ...] | None = None  # ImagePositionPatient (x, y, z), mm
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient: row then column direction
    pixel_spacing: tuple[float, ...] | None = None  # PixelSpacing (row, column), mm
    instance: int | None = None
    error: str | None = None


# A row's DICOM header by its path, None for a row that is not DICOM: what the series rules read
# when the headers come from somewhere other than the files (a DICOMweb server's metadata).
HeaderLookup = Callable[[str], DicomHeader | None]


def read_header(path: str) -> DicomHeader:
    """The header fields of one DICOM file, read without its pixel data."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except Exception as exc:  # pydicom raises many types for malformed files
        return DicomHeader(path, error=f"unreadable DICOM header ({type(exc).__name__}: {exc})")
    return header_of(path, ds)


def header_of(path: str, ds: Any) -> DicomHeader:
    """The header fields of a pydicom Dataset (a file's, or a DICOMweb server's metadata), keyed ``path``."""
    return DicomHeader(
        path=path,
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        modality=str(ds.get("Modality", "") or "").upper(),
        image_type=_strings(ds.get("ImageType")),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        instance=_integer(ds.get("InstanceNumber")),
    )


def _strings(value: Any) -> tuple[str, ...]:
    """A multi-valued string tag (or a single value) as upper-case strings."""
    if value is None:
        return ()
    return tuple(str(v).upper() for v in ([value] if isinstance(value, str) else value))


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _integer(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- one series


def series_columns(class_names: Sequence[str]) -> list[str]:
    """The series schema: identity, counts, label, scores, the peak slice, slice calls, issues."""
    return [
        "study_uid", "series_uid", "patient_id", "modality", "n_files", "n_slices", "label", "aggregate",
        *(probability_column(name) for name in class_names),
        "peak_class", "peak_slice", "peak_instance", "peak_path", "peak_p",
        *(f"n_{name}" for name in class_names),
        "n_unknown", "n_failed", "n_left_out", "warning", "error",
    ]  # fmt: skip


@dataclass
class _Slice:
    header: DicomHeader
    row: Mapping[str, Any]  # its prediction row


@dataclass
class _Series:
    slices: list[_Slice]
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    left_out: int = 0


def _counted(counter: Counter[str]) -> str:
    return ", ".join(f"{key or 'none'} {count}" for key, count in counter.most_common())


def _check_modality(series: _Series) -> None:
    modalities = Counter(s.header.modality for s in series.slices)
    if len(modalities) > 1:
        series.errors.append(f"mixed modalities in one series ({_counted(modalities)}): not aggregated")
    elif CT_MODALITY not in modalities:
        found = next(iter(modalities)) or "missing"
        series.errors.append(f"modality {found}: the model reads CT slices; series not classified")


def _drop_duplicates(series: _Series) -> None:
    seen: set[str] = set()
    kept, repeated = [], []
    for item in series.slices:
        uid = item.header.sop_uid
        (repeated if uid and uid in seen else kept).append(item)
        seen.add(uid)
    if repeated:
        example = Path(repeated[0].header.path).name
        series.warnings.append(
            f"{len(repeated)} file(s) repeat a SOPInstanceUID of this series (e.g. {example}): "
            "only the first file of each was used"
        )
        series.slices, series.left_out = kept, series.left_out + len(repeated)


def _drop_localizers(series: _Series) -> None:
    scouts = [s for s in series.slices if LOCALIZER in s.header.image_type]
    if scouts:
        series.warnings.append(f"{len(scouts)} localizer/scout image(s) (ImageType LOCALIZER) left out")
        series.slices = [s for s in series.slices if LOCALIZER not in s.header.image_type]
        series.left_out += len(scouts)


def _orientation_key(orientation: tuple[float, ...] | None) -> tuple[int, ...] | None:
    if orientation is None:
        return None
    return tuple(int(round(v / _ORIENTATION_TOLERANCE)) for v in orientation)


def _plane_name(orientation: tuple[float, ...] | None) -> str:
    if orientation is None:
        return "no orientation"
    normal = np.abs(np.cross(orientation[:3], orientation[3:]))
    names = ("sagittal", "coronal", "axial")
    return names[int(normal.argmax())] if normal.max() > 0.9 else "oblique"


def _keep_main_orientation(series: _Series) -> None:
    """Slices of other orientations are left out: one series is aggregated as one stack."""
    groups: dict[tuple[int, ...] | None, list[_Slice]] = {}
    for item in series.slices:
        groups.setdefault(_orientation_key(item.header.orientation), []).append(item)
    oriented = {key: members for key, members in groups.items() if key is not None}
    if len(oriented) <= 1:
        return
    main_key = max(oriented, key=lambda key: len(oriented[key]))
    described = ", ".join(  # largest group first: the same words whatever order the files were listed in
        f"{_plane_name(members[0].header.orientation)} {len(members)}"
        for members in sorted(oriented.values(), key=len, reverse=True)
    )
    others = sum(len(members) for key, members in oriented.items() if key != main_key)
    series.warnings.append(
        f"slices in {len(oriented)} orientations ({described}): the {len(oriented[main_key])} "
        f"{_plane_name(oriented[main_key][0].header.orientation)} slices aggregated, {others} left out"
    )
    series.slices = [s for s in series.slices if _orientation_key(s.header.orientation) in (main_key, None)]
    series.left_out += others


def _check_spacing(series: _Series) -> None:
    spacings = Counter(
        "x".join(f"{v:.2f}" for v in s.header.pixel_spacing)
        for s in series.slices
        if s.header.pixel_spacing is not None
    )
    if len(spacings) > 1:
        shown = ", ".join(f"{key} mm on {count}" for key, count in spacings.most_common())
        series.warnings.append(
            f"pixel spacing differs within the series ({shown}); each slice classified as it is"
        )


def _split_by_prediction(series: _Series) -> tuple[list[_Slice], int, int]:
    """(slices with probabilities to aggregate, failed count, unknown count); warns for the rest."""
    failed = [s for s in series.slices if is_failed(s.row)]
    unknown = [s for s in series.slices if is_unknown(s.row)]
    usable = [s for s in series.slices if not is_failed(s.row) and not is_unknown(s.row)]
    if failed:
        name, error = Path(failed[0].header.path).name, failed[0].row["error"]
        series.warnings.append(f"{len(failed)} slice(s) could not be read, e.g. {name}: {error}")
    if unknown:
        series.warnings.append(
            f"{len(unknown)} slice(s) rejected as {UNKNOWN_LABEL} by the OOD detector: "
            "left out of the aggregation"
        )
    return usable, len(failed), len(unknown)


def _ordered(series: _Series, usable: list[_Slice]) -> list[_Slice]:
    """Along the slice normal; by InstanceNumber, then by file, when positions are missing."""
    if all(s.header.position is not None and s.header.orientation is not None for s in usable):
        orientation = np.asarray(usable[0].header.orientation, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        along = [float(np.dot(np.asarray(s.header.position), normal)) for s in usable]
        order = np.argsort(along, kind="stable")
        ordered = [usable[i] for i in order]
        _check_steps(series, np.asarray(along)[order])
        return ordered
    lacking = sum(s.header.position is None or s.header.orientation is None for s in usable)
    if all(s.header.instance is not None for s in usable):
        series.warnings.append(
            f"ImagePositionPatient/ImageOrientationPatient missing on {lacking} slice(s): "
            "ordered by InstanceNumber"
        )
        return sorted(usable, key=lambda s: (s.header.instance, s.header.path))
    series.warnings.append(
        f"ImagePositionPatient/ImageOrientationPatient missing on {lacking} slice(s) and InstanceNumber on "
        f"{sum(s.header.instance is None for s in usable)}: ordered by file name"
    )
    return sorted(usable, key=lambda s: s.header.path)


def _check_steps(series: _Series, along: np.ndarray) -> None:
    """Repeated positions and gaps along the normal (``along``: sorted positions, mm)."""
    if len(along) < 3:
        return
    steps = np.diff(along)
    same = int((steps < _SAME_POSITION_MM).sum())
    if same:
        series.warnings.append(
            f"{same} slice(s) share a position with another slice (repeated acquisitions?)"
        )
    moving = steps[steps >= _SAME_POSITION_MM]
    if len(moving) == 0:
        return
    typical = float(np.median(moving))
    gaps = np.flatnonzero(steps > _GAP_FACTOR * typical)
    if len(gaps):
        first = int(gaps[0])
        series.warnings.append(
            f"{len(gaps)} gap(s) along z: {steps[first]:.1f} mm between slices {first} and {first + 1} "
            f"(typical step {typical:.1f} mm); slices may be missing"
        )


@dataclass(frozen=True)
class SeriesAssessment:
    """One series' row and the slices it aggregated, in order along z."""

    row: dict[str, Any]
    ordered: list[tuple[DicomHeader, Mapping[str, Any]]]  # empty when the series has an error


def assess_series(
    slices: Sequence[tuple[DicomHeader, Mapping[str, Any]]],
    class_names: Sequence[str],
    rule: SeriesRule,
    positive_class: str | None,
) -> SeriesAssessment:
    """The row of :func:`series_columns` for the files of one series (header, prediction row)."""
    series = _Series([_Slice(header, row) for header, row in slices])
    first = series.slices[0].header
    row: dict[str, Any] = dict.fromkeys(series_columns(class_names))
    row.update(study_uid=first.study_uid, series_uid=first.series_uid, patient_id=first.patient_id,
               modality="/".join(sorted({s.header.modality or "?" for s in series.slices})),
               n_files=len(series.slices), aggregate=rule.aggregate_label)  # fmt: skip
    _check_modality(series)
    _drop_duplicates(series)
    _drop_localizers(series)
    _keep_main_orientation(series)
    _check_spacing(series)
    usable, failed, unknown = _split_by_prediction(series)
    calls = Counter(str(s.row.get("label")) for s in usable)
    row.update({f"n_{name}": calls.get(name, 0) for name in class_names})
    row.update(n_unknown=unknown, n_failed=failed, n_left_out=series.left_out, n_slices=len(usable))
    if not series.errors and not usable:
        series.errors.append("no slice could be classified" + (" (see warning)" if series.warnings else ""))
    ordered: list[_Slice] = []
    if not series.errors:
        ordered = _ordered(series, usable)
        _label(row, series, ordered, class_names, rule, positive_class)
    row["warning"] = "; ".join(series.warnings) or None
    row["error"] = "; ".join(series.errors) or None
    return SeriesAssessment(row, [(s.header, s.row) for s in ordered])


def series_row(
    slices: Sequence[tuple[DicomHeader, Mapping[str, Any]]],
    class_names: Sequence[str],
    rule: SeriesRule,
    positive_class: str | None,
) -> dict[str, Any]:
    """:func:`assess_series`'s row."""
    return assess_series(slices, class_names, rule, positive_class).row


def _label(
    row: dict[str, Any],
    series: _Series,
    ordered: list[_Slice],
    class_names: Sequence[str],
    rule: SeriesRule,
    positive_class: str | None,
) -> None:
    if len(ordered) == 1:
        series.warnings.append("a series of one slice: its label is that slice's, not a study's")
    probabilities = row_probabilities((s.row for s in ordered), class_names)  # (S, C) in z order
    scores = rule.scores(probabilities, class_names)
    row["label"] = class_names[int(rule.decide(scores[None], class_names)[0])]
    row.update(
        {probability_column(name): float(score) for name, score in zip(class_names, scores, strict=True)}
    )
    if positive_class in class_names:
        column = probabilities[:, list(class_names).index(positive_class)]
        peak = int(column.argmax())
        row.update(peak_class=positive_class, peak_slice=peak, peak_instance=ordered[peak].header.instance,
                   peak_path=ordered[peak].header.path, peak_p=float(column[peak]))  # fmt: skip


# --------------------------------------------------------------------------- a predictions file


@dataclass(frozen=True)
class SeriesGroup:
    """The files of one series in the order they were listed, with their prediction rows."""

    key: tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)
    members: list[tuple[DicomHeader, Mapping[str, Any]]]


def group_series(
    rows: Sequence[Mapping[str, Any]], headers: Mapping[str, DicomHeader]
) -> tuple[list[SeriesGroup], list[DicomHeader]]:
    """Rows grouped by (study, series) UID in first-seen order, and the headers that name no series."""
    groups: dict[tuple[str, str], SeriesGroup] = {}
    orphans = []
    for row in rows:
        header = headers.get(str(row["path"]))
        if header is None:
            continue
        if header.error or not header.study_uid or not header.series_uid:
            orphans.append(header)
            continue
        key = (header.study_uid, header.series_uid)
        groups.setdefault(key, SeriesGroup(key, [])).members.append((header, row))
    return list(groups.values()), orphans


def _orphan_row(orphans: Sequence[DicomHeader], class_names: Sequence[str]) -> dict[str, Any]:
    """One error row for the DICOM files that belong to no series (unreadable header, no UIDs)."""
    row: dict[str, Any] = dict.fromkeys(series_columns(class_names))
    reasons = Counter(h.error or "no StudyInstanceUID/SeriesInstanceUID" for h in orphans)
    row.update(n_files=len(orphans), n_slices=0,
               error=f"{len(orphans)} DICOM file(s) belong to no series (e.g. {Path(orphans[0].path).name}): "
               + "; ".join(f"{reason} x{count}" for reason, count in reasons.most_common(3)))  # fmt: skip
    return row


def series_rows(
    rows: Sequence[Mapping[str, Any]],
    headers: Mapping[str, DicomHeader],
    class_names: Sequence[str],
    rule: SeriesRule,
    positive_class: str | None,
) -> list[dict[str, Any]]:
    """One row per series among prediction ``rows`` whose path has a header; plus one error
    row for DICOM files that name no series."""
    assessments, orphan = assess_all(rows, headers, class_names, rule, positive_class)
    return [assessment.row for assessment in assessments] + ([orphan] if orphan else [])


def assess_all(
    rows: Sequence[Mapping[str, Any]],
    headers: Mapping[str, DicomHeader],
    class_names: Sequence[str],
    rule: SeriesRule,
    positive_class: str | None,
) -> tuple[list[SeriesAssessment], dict[str, Any] | None]:
    """:func:`assess_series` of every series among ``rows``, and the error row of the DICOM files
    that name no series (None when there are none)."""
    groups, orphans = group_series(rows, headers)
    assessments = [assess_series(group.members, class_names, rule, positive_class) for group in groups]
    return assessments, (_orphan_row(orphans, class_names) if orphans else None)


class SeriesMode(str, Enum):
    """When predict writes series rows (``--series/--no-series``; default auto)."""

    AUTO = "auto"  # when every input is DICOM
    ON = "on"  # for the DICOM inputs among others
    OFF = "off"


@dataclass(frozen=True)
class SeriesSummary:
    """What :func:`write_series` wrote."""

    out: Path
    rule: str
    n_series: int
    label_counts: dict[str, int]
    n_warning: int
    n_error: int
    n_non_dicom: int  # prediction rows that are not DICOM files: part of no series
    rows: list[dict[str, Any]]
    # the series behind the rows, with their slices in z order (a DICOM SR is built from one)
    assessments: list[SeriesAssessment] = field(default_factory=list)


def series_path(predictions: str | os.PathLike[str]) -> Path:
    """Where series rows go: ``series.csv`` beside ``predictions.csv``; ``run.series.csv`` beside
    any other ``run.csv`` (the same suffix, so JSONL stays JSONL)."""
    predictions = Path(predictions)
    default = predictions.stem == Path(DEFAULT_PREDICTIONS_FILE).stem
    stem = SERIES_STEM if default else f"{predictions.stem}.{SERIES_STEM}"
    return predictions.with_name(stem + (predictions.suffix or ".csv"))


def read_prediction_rows(path: str | os.PathLike[str], fmt: str = "csv") -> list[dict[str, Any]]:
    """The rows of a predictions file (CSV or JSONL); empty CSV cells are None."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"predictions file {path} does not exist")
    with open(path, encoding="utf-8", newline="") as handle:
        if str(getattr(fmt, "value", fmt)) == "jsonl":
            try:
                return [json.loads(line) for line in handle if line.strip()]
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} is not JSON lines: {exc}") from None
        return [
            {key: (value if value != "" else None) for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]


def write_series(
    predictions: str | os.PathLike[str],
    *,
    class_names: Sequence[str],
    positive_class: str | None = DEFAULT_POSITIVE_CLASS,
    rule: SeriesRule | None = None,
    fmt: str = "csv",
    mode: SeriesMode | str = SeriesMode.AUTO,
    out: str | os.PathLike[str] | None = None,
) -> SeriesSummary | None:
    """Series rows for a finished predictions file, written atomically to ``out``
    (default :func:`series_path`). None when ``mode`` is off, or auto and some input is not DICOM.
    """
    options = SeriesOptions(mode, rule or SeriesRule())
    if options.mode is SeriesMode.OFF:
        return None
    rows = read_prediction_rows(predictions, fmt)
    run = assess_run_series(rows, class_names, positive_class, options.rule)
    target = Path(out) if out is not None else series_path(predictions)
    return write_run_series(run, options, target, class_names=class_names, fmt=fmt)


@dataclass(frozen=True)
class SeriesOptions:
    """``--series/--no-series``, ``--aggregate`` and ``--top-k``: whether a predict run writes
    series rows beside its predictions, and how a series is labelled."""

    mode: SeriesMode = SeriesMode.AUTO
    rule: SeriesRule = field(default_factory=SeriesRule)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", enum_choice(SeriesMode, self.mode, "--series"))


PYDICOM_HINT = "pip install 'kidney-edge[dicom]'"


def may_be_dicom(path: str) -> bool:
    """Whether a row's file may be DICOM by its name: not one of the raster image suffixes
    (DICOM files have ``.dcm``, no suffix, or a UID-style name; a DICOMweb path has none).
    A cheap test before :func:`~kidney_edge.imaging.is_dicom_file` opens the file."""
    return os.path.splitext(path)[1].lower() not in SUPPORTED_SUFFIXES - {".dcm"}


@dataclass(frozen=True)
class RunSeries:
    """The series among a finished run's rows, assessed once: the series rows and the triage
    page's strips are both made from it."""

    assessments: list[SeriesAssessment]
    orphan: dict[str, Any] | None  # the error row of the DICOM files that name no series
    n_dicom: int  # rows with a DICOM header (or a DICOM file without pydicom to read it)
    n_non_dicom: int
    note: str | None = None  # why the DICOM rows were not assessed (no pydicom to read headers)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [assessment.row for assessment in self.assessments] + ([self.orphan] if self.orphan else [])


def assess_run_series(
    rows: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    positive_class: str | None,
    rule: SeriesRule,
    headers: HeaderLookup | None = None,
) -> RunSeries:
    """:func:`assess_all` of the DICOM rows among ``rows``. ``headers``: the rows' headers when
    they are not files to read (a DICOMweb listing); None: read from the DICOM files among the
    rows, without pixels (no pydicom: nothing is assessed and ``note`` says how to get it)."""
    if headers is None:
        dicom = [row for row in rows if may_be_dicom(str(row["path"])) and is_dicom_file(str(row["path"]))]
        if dicom and not _has_pydicom():
            note = f"series need DICOM headers: {PYDICOM_HINT}"
            return RunSeries([], None, len(dicom), len(rows) - len(dicom), note)
        found = {str(row["path"]): read_header(str(row["path"])) for row in dicom}
    else:
        looked_up = ((str(row["path"]), headers(str(row["path"]))) for row in rows)
        found = {path: header for path, header in looked_up if header is not None}
        dicom = [row for row in rows if str(row["path"]) in found]
    assessments, orphan = assess_all(dicom, found, class_names, rule, positive_class)
    # From a listing, a row without a header is an error row of the source (a missing study),
    # not a non-DICOM input: it belongs to no series and counts as neither.
    non_dicom = len(rows) - len(dicom) if headers is None else 0
    return RunSeries(assessments, orphan, len(dicom), non_dicom)


def write_run_series(
    run: RunSeries,
    options: SeriesOptions,
    target: Path,
    *,
    class_names: Sequence[str],
    fmt: str = "csv",
) -> SeriesSummary | None:
    """The series rows of ``run`` written to ``target`` when ``options.mode`` asks for them: on,
    for the DICOM rows among others; auto, when every row is DICOM; off, never (None)."""
    if options.mode is SeriesMode.OFF or not run.n_dicom:
        if options.mode is SeriesMode.ON:
            log.warning("no DICOM files among the %d predictions: no series rows", run.n_non_dicom)
        return None
    if options.mode is SeriesMode.AUTO and run.n_non_dicom:
        return None
    if run.note is not None:
        raise InputError(f"series rows read DICOM headers: {PYDICOM_HINT}")
    summary = save_series_rows(run.rows, target, class_names=class_names, rule=options.rule, fmt=fmt,
                               n_non_dicom=run.n_non_dicom)  # fmt: skip
    return replace(summary, assessments=run.assessments)


def save_series_rows(
    result: Sequence[dict[str, Any]],
    target: Path,
    *,
    class_names: Sequence[str],
    rule: SeriesRule,
    fmt: str = "csv",
    n_non_dicom: int = 0,
) -> SeriesSummary:
    """Write series rows atomically to ``target`` (CSV or JSONL) and count them."""
    columns = series_columns(class_names)
    if str(getattr(fmt, "value", fmt)) == "jsonl":
        atomic_write_text(target, "".join(json.dumps({k: r[k] for k in columns}) + "\n" for r in result))
    else:
        atomic_write_text(target, csv_text(result, columns, float_digits=FLOAT_DIGITS))
    labels = Counter(str(row["label"]) for row in result if row["label"] is not None)
    log.info("wrote %d series rows to %s", len(result), target)
    return SeriesSummary(
        out=target,
        rule=rule.describe(),
        n_series=len(result),
        label_counts={name: labels.get(name, 0) for name in class_names},
        n_warning=sum(row["warning"] is not None for row in result),
        n_error=sum(row["error"] is not None for row in result),
        n_non_dicom=n_non_dicom,
        rows=list(result),
    )


def _has_pydicom() -> bool:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return False
    return True
