"""``predict --report``: one self-contained HTML triage page of a run's rows (no CDN, opens from disk).

:func:`write_report` takes prediction rows (any source: a folder, a resumed file, a DICOMweb
query) and the overlays a :class:`~kidney_edge.runtime.triage.TriageCollector` kept while they
streamed, and writes, atomically:

- a summary: counts per label (``unknown`` and unreadable files included), the model, its
  decision rule and precision, the run's throughput;
- the flagged rows first, as cards (thumbnail with its activation map, label, probabilities,
  path): positive calls, then uncertain rows, then unknowns, each group ranked by
  :func:`~kidney_edge.runtime.triage.triage` and cut at ``max_per_group``;
- for DICOM series: one strip per series (its most positive slices with their overlays, the
  series row) and the positive class's probability along z as inline SVG;
- the unreadable files with their reasons, and a compact table of every other row;
- a filter by label and a search by path (plain inline JavaScript, keyboard-usable controls).

Images are JPEG thumbnails in data URLs; nothing is fetched when the page opens. The page's
skeleton, CSS and script are ``static/report.html``.
"""

from __future__ import annotations

import html
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kidney_edge.errors import ImageReadError, InputError
from kidney_edge.imaging import load_image, to_view
from kidney_edge.io_utils import atomic_write_text
from kidney_edge.runtime.cam import heatmap, jpeg_data_url, overlay, overlay_on_slice
from kidney_edge.runtime.rows import PredictSummary, is_failed, probability_column, report_path
from kidney_edge.runtime.series import RunSeries, SeriesAssessment
from kidney_edge.runtime.triage import (
    DEFAULT_REPORT_MAX,
    FLAGGED,
    REPORT_MAX_LIMIT,
    STRIP_SLICES,
    THUMBNAIL_PX,
    Group,
    Overlay,
    TriageCollector,
    near_threshold,
    positive_probability,
    triage,
)
from kidney_edge.spec import UNKNOWN_LABEL, ModelSpec, RegionRule

log = logging.getLogger(__name__)

ERROR_LABEL = "error"  # the filter's and the counts' name for unreadable files
TABLE_MAX_ROWS = 20_000  # rows of the compact table; the rest are in the predictions file
INTENDED_USE = "Research and edge-deployment engineering. Not a medical device: not for diagnosis."
_GROUP_TITLES = {
    Group.POSITIVE: "Called {positive}, most probable first",
    Group.UNCERTAIN: "Uncertain: low confidence or near the threshold, least sure first",
    Group.UNKNOWN: "Unknown: rejected by the out-of-distribution detector, highest score first",
}
_TEMPLATE = resources.files("kidney_edge.runtime") / "static" / "report.html"
_BODY_MARK = "<!-- report:body -->"


def check_report_max(value: int) -> int:
    """``--report-max`` if it is in range, else an InputError naming the flag."""
    if not 1 <= value <= REPORT_MAX_LIMIT:
        raise InputError(f"--report-max must be in 1..{REPORT_MAX_LIMIT}, got {value}")
    return value


@dataclass(frozen=True)
class RunFacts:
    """What the summary says about the run beside the counts (from ``PredictSummary``)."""

    model: str
    precision: str  # fp32 or int8, and why
    decision_rule: str  # in words
    ood_detector: str | None
    processed: int  # rows this run wrote
    wall_s: float
    skipped: int = 0  # rows already in the output (--resume): they have no overlay
    evidence_note: str | None = None  # why this run's rows have no thumbnails, when they have none

    @classmethod
    def from_summary(cls, summary: PredictSummary, evidence_note: str | None = None) -> RunFacts:
        return cls(
            model=str(summary.model), precision=summary.precision_reason or summary.precision,
            decision_rule=summary.decision_rule, ood_detector=summary.ood_detector,
            processed=summary.processed, wall_s=summary.wall_s, skipped=summary.skipped,
            evidence_note=evidence_note,
        )  # fmt: skip


@dataclass(frozen=True)
class ReportPage:
    """What :func:`write_report` wrote."""

    path: Path
    bytes: int
    rows: int
    counts: dict[str, int]  # per label, unknown and error included
    cards: int
    series: int


# --------------------------------------------------------------------------- small pieces


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    """A number for the page: ``digits`` decimals; tiny non-zero ones in scientific notation."""
    if value is None or value == "":
        return ""
    try:
        number = float(value)
    except ValueError:
        return str(value)
    return f"{number:.1e}" if 0 < abs(number) < 10**-digits else f"{number:.{digits}f}"


def row_label(row: Mapping[str, Any]) -> str:
    """The label a row is counted and filtered under: its label, or ``error`` when unreadable."""
    return ERROR_LABEL if is_failed(row) else str(row.get("label"))


def label_counts(rows: Sequence[Mapping[str, Any]], spec: ModelSpec) -> dict[str, int]:
    """Rows per label: each class, ``unknown`` and ``error``, zeros included, in that order."""
    counted = Counter(row_label(row) for row in rows)
    names = (*spec.class_names, UNKNOWN_LABEL, ERROR_LABEL)
    return {name: counted.get(name, 0) for name in (*names, *sorted(set(counted) - set(names)))}


def _picture(item: Overlay, class_name: str, spec: ModelSpec, path: str) -> tuple[str, str]:
    """(JPEG data URL, alt text) of the activation map of ``class_name``: drawn back onto the whole
    slice, the model's region outlined, where the spec crops one; else over the model's view."""
    view = Image.fromarray(item.view).convert("RGB").resize((THUMBNAIL_PX,) * 2, Image.Resampling.BILINEAR)
    if item.cams is None or class_name not in spec.class_names:
        return jpeg_data_url(view), "the model's view"
    cam = item.cams[spec.class_names.index(class_name)]
    if spec.region is not RegionRule.WHOLE:
        drawn = _on_slice(item, heatmap(cam, spec.input_size), spec, path)
        if drawn is not None:
            alt = f"the slice with the activation map of {class_name}, the model's region outlined"
            return jpeg_data_url(drawn), alt
    alt = f"the model's view with the activation map of {class_name}"
    return jpeg_data_url(overlay(view, heatmap(cam, THUMBNAIL_PX))), alt


def _on_slice(item: Overlay, heat: np.ndarray, spec: ModelSpec, path: str) -> Image.Image | None:
    """The (S, S) ``heat`` drawn back onto the slice at ``path``, letterboxed to a thumbnail; None
    where the file no longer decodes to the view the row was predicted from."""
    try:
        image = load_image(path, spec)
    except (ImageReadError, OSError):
        return None
    view, geometry = to_view(image, spec)
    if np.abs(np.asarray(view, dtype=np.int16) - item.view).max(initial=0) > 1:
        return None  # the file changed since its row: its own view and map stay the honest picture
    return overlay_on_slice(image, heat, geometry, side=THUMBNAIL_PX)


def _shown_class(row: Mapping[str, Any]) -> str:
    """Whose activation map a card shows: the label's, or the most probable class's for unknown."""
    label = str(row.get("label"))
    return str(row.get("argmax_label")) if label == UNKNOWN_LABEL else label


def _probabilities(row: Mapping[str, Any], spec: ModelSpec) -> str:
    items = "".join(
        f"<li><span>{_e(name)}</span> <b>{_fmt(row.get(probability_column(name)))}</b></li>"
        for name in spec.class_names
    )
    return f'<ul class="probs">{items}</ul>'


def reason(row: Mapping[str, Any], spec: ModelSpec) -> str:
    """Why a row is flagged (or unreadable), in words."""
    group, rank = triage(row, spec)
    if group is Group.ERROR:
        return str(row.get("error"))
    if group is Group.UNKNOWN:
        return f"out-of-distribution score {_fmt(row.get('ood_score'), 4)} above the detector's threshold"
    if group is Group.POSITIVE:
        return f"called {spec.positive_class}: p = {_fmt(rank)}"
    if group is Group.UNCERTAIN:
        words = f"confidence {_fmt(row.get('confidence'))}"
        p_positive = positive_probability(row, spec)
        if near_threshold(p_positive, spec):
            words += f"; p({spec.positive_class}) {_fmt(p_positive)} just under the threshold {spec.decision_rule.threshold:g}"
        return words
    return ""


# --------------------------------------------------------------------------- sections


def _card(row: Mapping[str, Any], item: Overlay, spec: ModelSpec) -> str:
    label, path = row_label(row), str(row["path"])
    shown = _shown_class(row)
    note = "" if item.cams is not None else '<p class="note">no activation map in this model</p>'
    picture, alt = _picture(item, shown, spec, path)
    return (
        f'<article class="card" tabindex="0" data-label="{_e(label)}" data-path="{_e(path)}">'
        f'<img src="{picture}" width="{THUMBNAIL_PX}" height="{THUMBNAIL_PX}" '
        f'alt="{_e(os.path.basename(path))}: {_e(alt)}">'
        f'<h3 class="label">{_e(label)}</h3><p class="why">{_e(reason(row, spec))}</p>'
        f"{_probabilities(row, spec)}{note}"
        f'<p class="path" title="{_e(path)}">{_e(path)}</p></article>'
    )


def select_cards(
    rows: Sequence[Mapping[str, Any]], spec: ModelSpec, overlays: Mapping[str, Overlay], max_per_group: int
) -> dict[Group, list[Mapping[str, Any]]]:
    """The flagged rows shown as cards, per group in page order: those with an overlay, ranked by
    :func:`~kidney_edge.runtime.triage.triage`, the first ``max_per_group`` of each group."""
    ranked: dict[Group, list[tuple[float, int, Mapping[str, Any]]]] = {group: [] for group in FLAGGED}
    for position, row in enumerate(rows):
        group, rank = triage(row, spec)
        if group in ranked and str(row["path"]) in overlays:
            ranked[group].append((-rank, position, row))
    return {group: [row for *_, row in sorted(items)[:max_per_group]] for group, items in ranked.items()}


def _flagged_section(
    cards: Mapping[Group, list[Mapping[str, Any]]], spec: ModelSpec, overlays: Mapping[str, Overlay]
) -> str:
    parts = ['<section id="flagged" aria-labelledby="flagged-title"><h2 id="flagged-title">Flagged</h2>']
    for group, rows in cards.items():
        if group is Group.POSITIVE and spec.positive_class is None:
            continue
        title = _GROUP_TITLES[group].format(positive=spec.positive_class)
        body = "".join(_card(row, overlays[str(row["path"])], spec) for row in rows)
        parts.append(
            f'<h3 class="group" id="group-{group.value}">{_e(title)} ({len(rows)})</h3>'
            f'<div class="cards" data-group="{group.value}">{body or "<p>none</p>"}</div>'
        )
    return "".join(parts) + "</section>"


def _table(rows: Sequence[Mapping[str, Any]], spec: ModelSpec, *, note: str) -> str:
    heads = ["path", "label", "confidence", *(f"p({name})" for name in spec.class_names), "ood score", "flag"]
    body = []
    for row in rows[:TABLE_MAX_ROWS]:
        group, _ = triage(row, spec)
        cells = [row.get("label"), _fmt(row.get("confidence")),
                 *(_fmt(row.get(probability_column(name))) for name in spec.class_names),
                 _fmt(row.get("ood_score"), 4), "" if group is Group.OTHER else group.value]  # fmt: skip
        body.append(
            f'<tr data-label="{_e(row_label(row))}" data-path="{_e(row["path"])}"><td class="path">{_e(row["path"])}</td>'
            + "".join(f"<td>{_e(cell)}</td>" for cell in cells)
            + "</tr>"
        )
    more = len(rows) - TABLE_MAX_ROWS
    tail = f"<p>{more} more rows are in the predictions file only.</p>" if more > 0 else ""
    return (
        f'<section id="others"><h2>Everything else ({len(rows)})</h2><p class="note">{_e(note)}</p>'
        f'<table class="rows"><thead><tr>{"".join(f"<th scope=col>{_e(h)}</th>" for h in heads)}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>{tail}</section>"
    )


def _errors_section(rows: Sequence[Mapping[str, Any]]) -> str:
    failed = [row for row in rows if is_failed(row)]
    body = "".join(
        f'<tr data-label="{ERROR_LABEL}" data-path="{_e(row["path"])}"><td class="path">{_e(row["path"])}</td>'
        f'<td class="why">{_e(row["error"])}</td></tr>'
        for row in failed[:TABLE_MAX_ROWS]
    )
    return (
        f'<section id="errors"><h2>Unreadable files ({len(failed)})</h2>'
        + (
            f'<table class="rows"><thead><tr><th scope=col>path</th><th scope=col>reason</th></tr></thead>'
            f"<tbody>{body}</tbody></table>"
            if failed
            else "<p>none</p>"
        )  # fmt: skip
        + "</section>"
    )


# --------------------------------------------------------------------------- DICOM series


def z_curve(
    p: Sequence[float], key: Sequence[int], spec: ModelSpec, width: int = 320, height: int = 72
) -> str:
    """Inline SVG of p(positive) along z (slice order) on a 0..1 axis, the threshold dashed, key
    slices dotted."""
    left, pad, n = 16.0, 4.0, len(p)

    def x(i: int) -> float:
        return left + (width - left - pad) * (i / (n - 1) if n > 1 else 0.5)

    def y(value: float) -> float:
        return pad + (height - 2 * pad) * (1.0 - value)

    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(p))
    rule, peak = spec.decision_rule, int(np.argmax(p)) if n else 0
    line = ""
    if rule.kind == "threshold" and rule.threshold is not None:
        line = (f'<line class="threshold" x1="{left}" x2="{width - pad}" y1="{y(rule.threshold):.1f}" '
                f'y2="{y(rule.threshold):.1f}"/>')  # fmt: skip
    axis = f'<text x="2" y="{y(1.0) + 8:.1f}">1</text><text x="2" y="{y(0.0):.1f}">0</text>'
    dots = "".join(f'<circle cx="{x(i):.1f}" cy="{y(p[i]):.1f}" r="3"/>' for i in key)
    words = (
        f"p({spec.positive_class}) along z over {n} slices, peak {p[peak]:.3f} at slice {peak + 1}"
        if n
        else ""
    )
    return (
        f'<svg class="zcurve" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{_e(words)}"><title>{_e(words)}</title>'
        f'<rect x="{left}" y="0" width="{width - left}" height="{height}"/>{axis}'
        f'{line}<polyline points="{points}"/>{dots}</svg>'
    )


def _strip(assessment: SeriesAssessment, spec: ModelSpec, overlays: Mapping[str, Overlay]) -> str:
    row, ordered = assessment.row, assessment.ordered
    label = ERROR_LABEL if row.get("error") else str(row.get("label"))
    p = [positive_probability(slice_row, spec) or 0.0 for _, slice_row in ordered]
    key = sorted(sorted(range(len(p)), key=lambda i: -p[i])[:STRIP_SLICES])
    figures = []
    for i in key:
        path = ordered[i][0].path
        item = overlays.get(path)
        image = (f'<img src="{_picture(item, str(spec.positive_class), spec, path)[0]}" width="96" height="96" '
                 f'alt="slice {i + 1}">' if item is not None else '<div class="noimg">no overlay kept</div>')  # fmt: skip
        figures.append(
            f'<figure title="{_e(path)}">{image}<figcaption>z {i + 1}: p {p[i]:.3f}</figcaption></figure>'
        )
    scores = " ".join(f"{_e(name)} {_fmt(row.get(probability_column(name)))}" for name in spec.class_names)
    folder = os.path.dirname(str(ordered[0][0].path)) if ordered else ""
    problems = "".join(
        f'<p class="{kind}">{kind}: {_e(row[kind])}</p>' for kind in ("warning", "error") if row.get(kind)
    )
    return (
        f'<article class="series" tabindex="0" data-label="{_e(label)}" data-path="{_e(folder)}">'
        f'<h3>series {_e(row.get("series_uid"))}: <span class="label">{_e(label)}</span></h3>'
        f'<p class="facts">study {_e(row.get("study_uid"))}, patient {_e(row.get("patient_id"))}, '
        f"{row.get('n_slices')} slices ({_e(row.get('aggregate'))}): {scores}</p>{problems}"
        f'<div class="strip">{"".join(figures)}</div>{z_curve(p, key, spec) if p else ""}</article>'
    )


def _series_section(assessments: Sequence[SeriesAssessment], spec: ModelSpec, overlays: Mapping[str, Overlay],
                    max_series: int, note: str | None) -> str:  # fmt: skip
    if not assessments and note is None:
        return ""
    positive = probability_column(str(spec.positive_class))
    ranked = sorted(
        assessments, key=lambda a: (a.row.get("error") is not None, -float(a.row.get(positive) or 0.0))
    )
    strips = "".join(_strip(a, spec, overlays) for a in ranked[:max_series])
    more = len(ranked) - max_series
    tail = f"<p>{more} more series: see the series rows beside the predictions.</p>" if more > 0 else ""
    return (
        f'<section id="series"><h2>DICOM series ({len(assessments)}), most positive first</h2>'
        f"{f'<p class=note>{_e(note)}</p>' if note else ''}{strips}{tail}</section>"
    )


# --------------------------------------------------------------------------- summary and page


def _summary_section(
    counts: Mapping[str, int], spec: ModelSpec, facts: RunFacts, notes: Sequence[str]
) -> str:
    rows = "".join(
        f'<tr data-count-label="{_e(name)}"><th scope=row>{_e(name)}</th><td class="count">{count}</td></tr>'
        for name, count in counts.items()
    )
    speed = facts.processed / facts.wall_s if facts.wall_s > 0 else 0.0
    fingerprint = (spec.data_fingerprint or "not recorded")[:16]
    items = {
        "Model": f"{facts.model}: {spec.arch} at {spec.input_size} px, classes {', '.join(spec.class_names)}, "
        f"toolkit {spec.toolkit_version}, training data {fingerprint}",
        "Decision rule": facts.decision_rule,
        "Precision": facts.precision,
        "Unknown inputs": facts.ood_detector or "off (no OOD detector in this model, or --no-ood)",
        "Throughput": f"this run: {facts.processed} images in {facts.wall_s:.1f} s = {speed:.1f} images/s",
    }
    listed = "".join(f"<dt>{_e(term)}</dt><dd>{_e(text)}</dd>" for term, text in items.items())
    return (
        f'<section id="summary"><h2>Summary</h2><table class="counts"><tbody>{rows}'
        f'<tr class="total"><th scope=row>all rows</th><td id="total">{sum(counts.values())}</td></tr>'
        f'</tbody></table><dl class="facts">{listed}</dl>'
        + "".join(f'<p class="note">{_e(note)}</p>' for note in notes)
        + "</section>"
    )


def _controls(counts: Mapping[str, int]) -> str:
    options = "".join(
        f'<option value="{_e(name)}">{_e(name)} ({count})</option>' for name, count in counts.items()
    )
    return (
        '<form id="controls" role="search" onsubmit="return false">'
        f'<label for="label-filter">Label</label> <select id="label-filter"><option value="">all</option>{options}</select> '
        '<label for="path-search">Path contains</label> '
        '<input id="path-search" type="search" autocomplete="off" placeholder="press / to search"> '
        '<output id="shown" for="label-filter path-search" aria-live="polite"></output></form>'
    )


def _notes(facts: RunFacts, max_per_group: int) -> list[str]:
    notes = [
        f"Cards: up to {max_per_group} per group (--report-max) of this run's rows, each with the model's "
        "view and the activation map from the same ONNX call that produced its row."
    ]
    if facts.skipped:
        notes.append(
            f"{facts.skipped} rows were already in the predictions file (--resume): the page counts and lists "
            "them, but they have no thumbnails, so flagged ones among them are in the table."
        )
    if facts.evidence_note:
        notes.append(facts.evidence_note)
    return notes


def write_report(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    spec: ModelSpec,
    facts: RunFacts,
    overlays: Mapping[str, Overlay] | None = None,
    *,
    max_per_group: int = DEFAULT_REPORT_MAX,
    series: RunSeries | None = None,
) -> ReportPage:
    """The triage page of ``rows`` (every row of the run, old and new), written atomically to ``path``.

    ``overlays`` (path -> :class:`~kidney_edge.runtime.triage.Overlay`) are the pictures kept
    while the rows streamed; a flagged row without one is listed in the table instead of a card.
    ``series``: the run's DICOM series as assessed for its series rows
    (:func:`~kidney_edge.runtime.series.assess_run_series`), one strip each; None (a run without
    series, e.g. ``--no-series``): no series section.
    """
    overlays = overlays or {}
    counts = label_counts(rows, spec)
    cards = select_cards(rows, spec, overlays, max_per_group)
    carded = {str(row["path"]) for group in cards.values() for row in group}
    rest = [row for row in rows if not is_failed(row) and str(row["path"]) not in carded]
    assessments, series_note = (series.assessments, series.note) if series is not None else ([], None)
    body = "".join((
        f'<header><h1>kidney-edge triage: {len(rows)} rows</h1><p class="banner">{_e(INTENDED_USE)}</p>'
        f'<p class="when">written {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}</p></header>',
        _summary_section(counts, spec, facts, _notes(facts, max_per_group)),
        _controls(counts),
        _flagged_section(cards, spec, overlays),
        _series_section(assessments, spec, overlays, max_per_group, series_note),
        _errors_section(rows),
        _table(rest, spec, note="Rows without a card: unflagged rows, and flagged rows beyond --report-max or without "
               "a thumbnail. The flag column names their group."),
    ))  # fmt: skip
    page = _TEMPLATE.read_text(encoding="utf-8").replace(_BODY_MARK, body)
    atomic_write_text(path, page)
    shown = sum(len(group) for group in cards.values())
    log.info(
        "wrote the triage page %s (%d rows, %d cards, %d series)", path, len(rows), shown, len(assessments)
    )
    return ReportPage(Path(path), len(page.encode("utf-8")), len(rows), counts, shown, len(assessments))


# --------------------------------------------------------------------------- a predict run's page


@dataclass(frozen=True)
class ReportOptions:
    """``predict --report``, ``--report-path FILE`` and ``--report-max N``: where the page goes
    and how many cards."""

    path: Path | None = None  # None: rows.report_path(--out)
    max_per_group: int = DEFAULT_REPORT_MAX

    def __post_init__(self) -> None:
        check_report_max(self.max_per_group)
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))
            if self.path.is_dir() or self.path.suffix.lower() not in (".html", ".htm"):
                raise InputError(
                    f"--report-path {self.path}: pass a file name ending in .html, or drop it for the "
                    "default beside --out"
                )

    def target(self, out: Path) -> Path:
        return self.path if self.path is not None else report_path(out)


def check_report_format(fmt: Any) -> None:
    """The page reads every row back from ``--out`` at the end: a CSV or JSONL file."""
    if str(getattr(fmt, "value", fmt)) not in ("csv", "jsonl"):
        raise InputError("--report reads the rows back from --out at the end: pass --format csv or jsonl")


def write_run_report(
    options: ReportOptions,
    out: Path,
    rows: Sequence[Mapping[str, Any]],
    spec: ModelSpec,
    summary: PredictSummary,
    collector: TriageCollector,
    series: RunSeries | None = None,
) -> ReportPage:
    """The page of a finished predict run: ``rows``, every row of ``out`` (old ones too, with
    --resume), the overlays ``collector`` kept, and the run's ``series`` (None: no strips)."""
    note = None
    if summary.processed and not collector.received_evidence:
        note = "This engine returns rows only (no model inputs or activation maps): flagged rows are in the table."
    return write_report(
        options.target(out), rows, spec, RunFacts.from_summary(summary, note), collector.overlays(),
        max_per_group=options.max_per_group, series=series,
    )  # fmt: skip
