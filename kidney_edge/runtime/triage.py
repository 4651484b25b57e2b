"""Which prediction rows a person should look at first, and their pictures, kept while rows stream.

:func:`triage` puts a row in one :class:`Group` with a rank (higher: look sooner): calls of the
positive class by its probability, then uncertain rows (low confidence, or the positive class just
under a threshold rule), then unknowns (the OOD detector's rejections) by their score, then
unreadable files. The triage page (:mod:`~kidney_edge.runtime.report_page`) orders its cards by
the same function.

:class:`TriageCollector` runs beside a predict run: for each batch it gets the rows and what the
same ONNX call gave beside them (the model inputs and, when the graph has them, the class
activation maps) and keeps an :class:`Overlay` only for the rows that will be shown: the top
``max_per_group`` of each flagged group, and the ``STRIP_SLICES`` most positive slices of up to
``max_per_group`` series for the series strips. A series is the (study, series) UID pair of the
rows' headers when the run has them without reading files (a DICOMweb listing), else a folder of
DICOM files: reading every file's header while rows stream would cost a second read per row.
Memory stays bounded by those counts, whatever the run's size; no row is inferred twice.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np

from kidney_edge.runtime.rows import is_failed, is_unknown, probability_column
from kidney_edge.runtime.series import HeaderLookup, may_be_dicom
from kidney_edge.spec import ColorMode, ModelSpec, RuleKind

DEFAULT_REPORT_MAX = 50  # cards per flagged group (--report-max), strips of series
REPORT_MAX_LIMIT = 1000
THUMBNAIL_PX = 128  # side of a shown view: cards show it as is, strips at 96 px
STRIP_SLICES = 5  # key slices of a series strip: its most positive ones, shown in z order
# Uncertain: the label's probability under this (4 classes: no clear winner), or the positive
# class at or above this fraction of a threshold rule's threshold without reaching it.
LOW_CONFIDENCE = 0.6
NEAR_THRESHOLD_FRACTION = 0.75


class Group(str, Enum):
    """Where a row goes on the triage page, in the order the page shows them."""

    POSITIVE = "positive"  # labelled the positive class: most probable first
    UNCERTAIN = "uncertain"  # low confidence or near the threshold: least sure first
    UNKNOWN = "unknown"  # rejected by the OOD detector: highest score first
    ERROR = "error"  # unreadable: listed with its reason
    OTHER = "other"  # everything else: the compact table


FLAGGED = (Group.POSITIVE, Group.UNCERTAIN, Group.UNKNOWN)


def _number(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


def triage(row: Mapping[str, Any], spec: ModelSpec) -> tuple[Group, float]:
    """The row's :class:`Group` and its rank within it (higher: shown sooner).

    Ranks: positive calls by p(positive); uncertain rows by ``1 - confidence``, or
    ``p(positive) / threshold`` when just under a threshold rule's threshold (the larger); unknowns
    by OOD score. Rows read back from CSV (text) rank as the numbers they hold.
    """
    if is_failed(row):
        return Group.ERROR, 0.0
    if is_unknown(row):
        return Group.UNKNOWN, _number(row.get("ood_score")) or 0.0
    positive = spec.positive_class
    p_positive = _number(row.get(probability_column(positive))) if positive else None
    if positive is not None and row.get("label") == positive:
        return Group.POSITIVE, p_positive or 0.0
    unsure = 1.0 - (_number(row.get("confidence")) or 0.0)
    near = near_threshold(p_positive, spec)
    if unsure > 1.0 - LOW_CONFIDENCE or near:
        return Group.UNCERTAIN, max(unsure, near)
    return Group.OTHER, 0.0


def near_threshold(p_positive: float | None, spec: ModelSpec) -> float:
    """``p / threshold`` when p(positive) is within :data:`NEAR_THRESHOLD_FRACTION` under a
    threshold rule's threshold, else 0 (argmax rules have no threshold to be near)."""
    rule = spec.decision_rule
    if rule.kind != RuleKind.THRESHOLD or p_positive is None or not rule.threshold:
        return 0.0
    ratio = p_positive / rule.threshold
    return ratio if NEAR_THRESHOLD_FRACTION <= ratio < 1.0 else 0.0


def positive_probability(row: Mapping[str, Any], spec: ModelSpec) -> float | None:
    """p(positive class) of a classified row; None for an error row or a spec without one."""
    if spec.positive_class is None or is_failed(row):
        return None
    return _number(row.get(probability_column(spec.positive_class)))


@dataclass(frozen=True)
class Overlay:
    """A row's picture: the model's view of the file and the class activation maps of the same call."""

    view: np.ndarray  # (S, S) or (S, S, 3) uint8: the model input, de-normalised (model_view)
    cams: np.ndarray | None  # (C, h, w) float32 class activation maps; None without a cam output


class RowEvidence(Protocol):
    """What one ONNX call gave beside a batch's rows, by row index (``predict.Classified``)."""

    inputs: Mapping[int, np.ndarray]  # (3, S, S) float32 model inputs: valid during the call only
    cams: Mapping[int, np.ndarray]  # (C, h, w) class activation maps, when the graph has them


def model_view(model_input: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """(3, S, S) float32 model input -> what the model saw, as uint8: (S, S) for a gray spec (its
    three channels are one plane), else (S, S, 3) RGB; ``preprocess``'s ``(pixel - mean) / std``
    and channel order undone. Kept at the input size: resizing waits for the few shown."""
    channels = (
        (0,) if spec.color_mode == ColorMode.GRAY else (2, 1, 0) if spec.channel_order == "BGR" else (0, 1, 2)
    )
    planes = [
        np.clip(np.rint(model_input[c] * np.float32(spec.std[c]) + np.float32(spec.mean[c])), 0, 255).astype(
            np.uint8
        )
        for c in channels
    ]
    return planes[0] if len(planes) == 1 else np.stack(planes, axis=-1)


@dataclass(order=True)
class _Kept:
    rank: float
    order: int  # ties: the earlier row stays
    path: str = field(compare=False)
    overlay: Overlay = field(compare=False)


class TriageCollector:
    """Keeps, while rows stream, the overlays of the rows the triage page will show (see module)."""

    def __init__(
        self,
        spec: ModelSpec,
        max_per_group: int = DEFAULT_REPORT_MAX,
        headers: HeaderLookup | None = None,
        *,
        series: bool = True,
    ) -> None:
        """``headers``: the rows' DICOM headers by path, when the run has them (see module);
        None: a series is a folder of DICOM files. ``series``: keep the strips' slices (False: the
        run assesses no series, so its page has no strips)."""
        self.spec, self.max_per_group, self._headers = spec, max_per_group, headers
        self._keep_series = series
        self._groups: dict[Group, list[_Kept]] = {group: [] for group in FLAGGED}
        self._series: dict[str, list[_Kept]] = {}  # series -> its most positive slices (min-heap)
        self._order = itertools.count()
        self.received_evidence = False  # whether the engine handed over any model input

    def add(self, rows: Sequence[Mapping[str, Any]], evidence: RowEvidence | None) -> None:
        """A batch of rows as written; ``evidence`` None (an engine that returns rows only) keeps nothing."""
        if evidence is None:
            return
        self.received_evidence = True
        for index, row in enumerate(rows):
            model_input = evidence.inputs.get(index)
            if model_input is not None:
                overlay = _Pending(model_input, evidence.cams.get(index), self.spec)
                self._offer_group(row, overlay)
                if self._keep_series:
                    self._offer_series(row, overlay)

    def _offer_group(self, row: Mapping[str, Any], overlay: _Pending) -> None:
        group, rank = triage(row, self.spec)
        heap = self._groups.get(group)
        if heap is not None:
            _push_bounded(heap, rank, next(self._order), str(row["path"]), overlay, self.max_per_group)

    def _series_of(self, path: str) -> str | None:
        """The series a row's slice belongs to (see module); None: not DICOM, or no series UID."""
        if self._headers is None:
            return os.path.dirname(path) if may_be_dicom(path) else None
        header = self._headers(path)
        return f"{header.study_uid}/{header.series_uid}" if header is not None and header.series_uid else None

    def _offer_series(self, row: Mapping[str, Any], overlay: _Pending) -> None:
        p_positive = positive_probability(row, self.spec)
        series = None if p_positive is None else self._series_of(str(row["path"]))
        if p_positive is None or series is None:
            return
        heap = self._series.get(series)
        if heap is None:
            if len(self._series) >= self.max_per_group:  # full: evict the least positive series
                weakest = min(self._series, key=lambda name: max(self._series[name]).rank)
                if max(self._series[weakest]).rank >= p_positive:
                    return
                del self._series[weakest]
            heap = self._series[series] = []
        _push_bounded(heap, p_positive, next(self._order), str(row["path"]), overlay, STRIP_SLICES)

    def overlays(self) -> dict[str, Overlay]:
        """Path -> overlay of every row kept, for :func:`~kidney_edge.runtime.report_page.write_report`."""
        heaps = itertools.chain(self._groups.values(), self._series.values())
        return {kept.path: kept.overlay for heap in heaps for kept in heap}


class _Pending:
    """A row's :class:`Overlay`, built on the first call only: most rows are never kept. Called
    while the batch's buffer still holds the row's input."""

    def __init__(self, model_input: np.ndarray, cams: np.ndarray | None, spec: ModelSpec) -> None:
        self._input, self._cams, self._spec = model_input, cams, spec
        self._made: Overlay | None = None

    def __call__(self) -> Overlay:
        if self._made is None:
            cams = None if self._cams is None else np.array(self._cams, np.float32)
            self._made = Overlay(model_view(self._input, self._spec), cams)
        return self._made


def _push_bounded(
    heap: list[_Kept], rank: float, order: int, path: str, overlay: _Pending, limit: int
) -> None:
    """Keep the ``limit`` highest ranks in the min-heap ``heap``; ``overlay()`` only for a row kept."""
    if len(heap) < limit:
        heapq.heappush(heap, _Kept(rank, -order, path, overlay()))
    elif rank > heap[0].rank:
        heapq.heapreplace(heap, _Kept(rank, -order, path, overlay()))
