"""Series-level evaluation: each series' truth, sensitivity and specificity per class, the series
operating point chosen on validation series, and the report's "per series" section.

The series rows themselves come from :mod:`kidney_edge.runtime.series` (what predict writes);
this module only scores them. A series' truth is read off its slices' labels
(:data:`TRUTH_RULE`, :func:`series_truth`); the phantom's series_truth.csv names the same finding.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge import metrics as M
from kidney_edge.imaging import SUPPORTED_SUFFIXES, is_dicom_file
from kidney_edge.io_utils import atomic_write_text, csv_text
from kidney_edge.runtime.rows import FLOAT_DIGITS, prediction_rows, row_probabilities
from kidney_edge.runtime.series import (
    DicomHeader,
    SeriesRule,
    assess_series,
    group_series,
    read_header,
    series_columns,
)
from kidney_edge.spec import DecisionRule, ModelSpec

log = logging.getLogger(__name__)

TRUTH_RULE = "the positive class when any slice shows it, else the most frequent finding, else no finding"
STRIP_SERIES_LIMIT = 24  # series drawn in the report's per-series section (misclassified first)
STRIP_SLICES = 12  # slices shown per strip, evenly spaced along z
_RASTER_SUFFIXES = SUPPORTED_SUFFIXES - {".dcm"}


def series_truth(
    slice_labels: Sequence[str], class_names: Sequence[str], normal_class: str, positive_class: str | None
) -> str:
    """The finding a series shows, from its slices' true labels: :data:`TRUTH_RULE`."""
    findings = Counter(label for label in slice_labels if label != normal_class)
    if not findings:
        return normal_class if normal_class in class_names else Counter(slice_labels).most_common(1)[0][0]
    if positive_class in findings:
        return str(positive_class)
    order = {name: index for index, name in enumerate(class_names)}
    return max(findings, key=lambda name: (findings[name], -order.get(name, 0)))


@dataclass(frozen=True)
class SeriesResult:
    """One series: its row under a rule, its truth, and its slices along z."""

    row: dict[str, Any]
    truth: str
    probabilities: np.ndarray  # (S, C) slice probabilities in z order; (0, C) for an error row
    paths: list[str]  # slice files in z order
    slice_truth: list[str]  # true label of each slice in z order


def assess_labelled(
    rows: Sequence[Mapping[str, Any]],
    headers: Mapping[str, DicomHeader],
    class_names: Sequence[str],
    rule: SeriesRule,
    positive_class: str | None,
) -> list[SeriesResult]:
    """Series results for labelled prediction rows (``true_label`` set), one per series."""
    groups, orphans = group_series(rows, headers)
    if orphans:
        log.warning("%d DICOM files belong to no series and are left out of series metrics", len(orphans))
    results = []
    for group in groups:
        assessed = assess_series(group.members, class_names, rule, positive_class)
        truth = series_truth([str(row["true_label"]) for _, row in group.members], class_names,
                             rule.normal_class, positive_class)  # fmt: skip
        ordered = assessed.ordered
        probabilities = row_probabilities((row for _, row in ordered), class_names)
        results.append(
            SeriesResult(
                row=assessed.row,
                truth=truth,
                probabilities=probabilities.reshape(len(ordered), len(class_names)),
                paths=[header.path for header, _ in ordered],
                slice_truth=[str(row["true_label"]) for _, row in ordered],
            )
        )
    return results


def relabel(
    results: Sequence[SeriesResult], rule: SeriesRule, class_names: Sequence[str]
) -> tuple[np.ndarray, list[str | None]]:
    """(N, C) series scores and labels of ``results`` under another rule (errors: NaN, None)."""
    scores = np.full((len(results), len(class_names)), np.nan)
    labels: list[str | None] = []
    for index, result in enumerate(results):
        if len(result.probabilities) == 0:
            labels.append(None)
            continue
        scores[index] = rule.scores(result.probabilities, class_names)
        labels.append(class_names[int(rule.decide(scores[index][None], class_names)[0])])
    return scores, labels


def series_metrics(
    truths: Sequence[str], labels: Sequence[str | None], class_names: Sequence[str]
) -> dict[str, Any]:
    """Series-level accuracy, and sensitivity / specificity per class (one class against the rest).

    Series without a label (an error row) are counted in ``n_unlabelled`` and left out of the
    rates, which are None when undefined (no series of the class, or only series of it).
    """
    pairs = [(t, p) for t, p in zip(truths, labels, strict=True) if p is not None]
    per_class = {}
    for name in class_names:
        positives = [p for t, p in pairs if t == name]
        negatives = [p for t, p in pairs if t != name]
        per_class[name] = {
            "support": len(positives),
            "predicted": sum(p == name for _, p in pairs),
            "sensitivity": sum(p == name for p in positives) / len(positives) if positives else None,
            "specificity": sum(p != name for p in negatives) / len(negatives) if negatives else None,
        }
    return {
        "n_series": len(truths),
        "n_unlabelled": len(truths) - len(pairs),
        "accuracy": sum(t == p for t, p in pairs) / len(pairs) if pairs else None,
        "per_class": per_class,
        "confusion": {t: dict(Counter(p for tt, p in pairs if tt == t)) for t in class_names},
    }


def choose_series_rule(
    results: Sequence[SeriesResult],
    class_names: Sequence[str],
    *,
    aggregate: str,
    top_k: int,
    positive_class: str | None,
    target_recall: float = 0.98,
) -> SeriesRule:
    """The series operating point, chosen on these (validation) series the way the slice rule is
    chosen on validation slices: :func:`kidney_edge.metrics.tumor_decision_rule` on series scores."""
    base = SeriesRule(aggregate=aggregate, top_k=top_k)
    scores, labels = relabel(results, base, class_names)
    keep = [index for index, label in enumerate(labels) if label is not None]
    truth = np.array([list(class_names).index(results[i].truth) for i in keep], dtype=np.int64)
    # No limit on added positive calls: a validation split holds a few dozen series, where one
    # added call is already several percent (the rules in benchmarks/results/series.md were chosen so).
    decision = M.tumor_decision_rule(scores[keep], truth, tuple(class_names), positive_class=positive_class,
                                     target_recall=target_recall, max_added_false_positives=None)  # fmt: skip
    return SeriesRule(aggregate=aggregate, top_k=top_k, decision=decision or DecisionRule())


def _all_dicom(paths: Sequence[str]) -> bool:
    if not paths or any(Path(p).suffix.lower() in _RASTER_SUFFIXES for p in paths):
        return False
    return all(is_dicom_file(p) for p in paths)


def series_evaluation(
    paths: Sequence[str | Path],
    labels: Sequence[str],
    probabilities: np.ndarray,
    spec: ModelSpec,
    out_dir: Path,
    rule: SeriesRule | None = None,
) -> dict[str, Any]:
    """metrics.json's ``series`` block when every evaluated file is DICOM ({} otherwise), and
    ``out_dir/series.csv`` (predict's series schema plus ``true_label``)."""
    paths = [str(p) for p in paths]
    if not _all_dicom(paths):
        return {}
    rule = rule or SeriesRule()
    rows = prediction_rows(paths, probabilities, spec, true_labels=labels)
    headers = {path: read_header(path) for path in paths}
    results = assess_labelled(rows, headers, spec.class_names, rule, spec.positive_class)
    table = [{**r.row, "true_label": r.truth} for r in results]
    columns = [*series_columns(spec.class_names), "true_label"]
    atomic_write_text(Path(out_dir) / "series.csv", csv_text(table, columns, float_digits=FLOAT_DIGITS))
    block = series_metrics([r.truth for r in results], [r.row["label"] for r in results], spec.class_names)
    block.update(
        rule=rule.to_dict(), truth_rule=TRUTH_RULE, series=[_series_record(r, spec) for r in results]
    )
    log.info("series: %d series, accuracy %s", block["n_series"], block["accuracy"])
    return {"series": block}


def _series_record(result: SeriesResult, spec: ModelSpec) -> dict[str, Any]:
    positive = spec.positive_class
    curve = []
    if positive in spec.class_names and len(result.probabilities):
        curve = [float(p) for p in result.probabilities[:, spec.class_names.index(positive)]]
    return {
        "series_uid": result.row["series_uid"],
        "patient_id": result.row["patient_id"],
        "truth": result.truth,
        "label": result.row["label"],
        "warning": result.row["warning"],
        "error": result.row["error"],
        "curve_class": positive,
        "curve": curve,
        "paths": result.paths,
        "slice_truth": result.slice_truth,
    }


# --------------------------------------------------------------------------- report section


def per_series_html(block: Mapping[str, Any] | None, spec: ModelSpec) -> str:
    """The report's "per series" section: metrics per class, then for each series a strip of its
    slices along z above its positive-class probability curve (misclassified series first)."""
    if not block:
        return (
            "<p>No DICOM series in this data: series-level results need DICOM slices with study "
            "and series UIDs.</p>"
        )
    rows = []
    for name, values in block["per_class"].items():
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{values['support']}</td>"
            f"<td>{_rate(values['sensitivity'])}</td><td>{_rate(values['specificity'])}</td>"
            f"<td>{values['predicted']}</td></tr>"
        )
    head = (
        f"<p>{block['n_series']} series ({block['n_unlabelled']} without a label), series accuracy "
        f"{_rate(block['accuracy'])}. Rule: {html.escape(block['rule']['description'])}. Truth per series: "
        f"{html.escape(block['truth_rule'])}.</p><table><thead><tr><th>class</th><th>series</th>"
        "<th>sensitivity</th><th>specificity</th><th>called</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    records = sorted(block["series"], key=lambda r: r["label"] == r["truth"])[:STRIP_SERIES_LIMIT]
    shown = f"<p>{len(records)} of {len(block['series'])} series, misclassified first.</p>"
    normal = block["rule"]["normal_class"]
    return head + shown + "".join(_strip_html(record, spec, normal) for record in records)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _strip_html(record: Mapping[str, Any], spec: ModelSpec, normal_class: str) -> str:
    verdict = "correct" if record["label"] == record["truth"] else "MISCLASSIFIED"
    title = (
        f"{record['patient_id']} series {record['series_uid']}: truth {record['truth']}, "
        f"called {record['label'] or 'nothing'} ({verdict})"
    )
    notes = " ".join(html.escape(str(record[key])) for key in ("error", "warning") if record[key])
    image = "" if not record["paths"] else _strip_png(record, spec, normal_class)
    return f"<h3>{html.escape(title)}</h3>" + (f"<p class='warn'>{notes}</p>" if notes else "") + image


def _strip_png(record: Mapping[str, Any], spec: ModelSpec, normal_class: str) -> str:
    from matplotlib.figure import Figure
    from PIL import Image

    from kidney_edge.imaging import resized_image

    paths, curve = record["paths"], record["curve"]
    picks = np.unique(np.linspace(0, len(paths) - 1, min(STRIP_SLICES, len(paths))).round().astype(int))
    thumbs = [
        resized_image(paths[i], spec).convert("L").resize((64, 64), Image.Resampling.BILINEAR) for i in picks
    ]
    strip = np.hstack([np.asarray(t) for t in thumbs])
    figure = Figure(figsize=(max(4.0, 0.7 * len(picks)), 2.6), dpi=90)
    top, bottom = figure.subplots(2, 1, height_ratios=[1.0, 0.9])
    top.imshow(strip, cmap="gray", vmin=0, vmax=255, aspect="equal")
    top.set_xticks([(k + 0.5) * 64 for k in range(len(picks))], [str(i) for i in picks], fontsize=7)
    top.set_yticks([])
    positions = np.arange(len(curve))
    finding = [i for i, label in enumerate(record["slice_truth"]) if label == record["truth"] != normal_class]
    for index in finding:
        bottom.axvspan(index - 0.5, index + 0.5, color="tab:orange", alpha=0.2, lw=0)
    bottom.plot(positions, curve, marker=".", color="tab:red")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlim(-0.5, max(0.5, len(curve) - 0.5))
    bottom.set_xlabel("slice along z (shaded: the truth's finding)", fontsize=7)
    bottom.set_ylabel(f"p({record['curve_class']})", fontsize=7)
    bottom.tick_params(labelsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<p><img src="data:image/png;base64,{data}" alt="slices and probability along z"></p>'
