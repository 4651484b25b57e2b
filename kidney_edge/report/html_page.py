"""``report.html``: one self-contained page that embeds every plot as a base64 PNG data URI
and carries its own CSS, so it opens offline from an e-mail attachment.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Sequence

from kidney_edge.layout import (
    BEST_CHECKPOINT,
    HISTORY_FILE,
    SPLITS_AUDIT_FILE,
)
from kidney_edge.report.card import Block, blocks_to_html
from kidney_edge.report.figures import (
    PER_CLASS_HEADER,
    RULE_COMPARISON_HEADER,
    audit_summary,
    format_number,
    headline_caption,
    headline_header,
    headline_rows,
    interval_note,
    operating_point_text,
    ordered_classes,
    per_class_rows,
    rule_comparison_rows,
    truncate,
)
from kidney_edge.report.inputs import ReportInputs
from kidney_edge.report.plots import (
    CONFUSION_PNG,
    CONFUSION_RULE_PNG,
    ERROR_GALLERY_PNG,
    RELIABILITY_PNG,
    ROC_PR_PNG,
    TRAINING_CURVES_PNG,
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .7em;text-align:right}
th{background:#f3f5f8}td:first-child,th:first-child{text-align:left}
.meta{color:#555;font-size:.92em}.warn{background:#fff4e0;border-left:4px solid #e69500;padding:.5em 1em}
img{max-width:100%;height:auto;border:1px solid #eee}
table.text td,table.text th{text-align:left}nav a{margin-right:1em}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
"""
SECTIONS = (
    ("headline", "Headline figures"),
    ("operating-point", "Argmax vs tumor operating point"),
    ("confusion", "Confusion matrices"),
    ("training", "Training curves"),
    ("roc-pr", "ROC and precision-recall curves"),
    ("calibration", "Calibration"),
    ("split-audit", "Split and leakage audit"),
    ("errors", "Error gallery"),
    ("per-series", "Per series"),
    ("model-card", "Model card"),
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<table{attribute}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    if name not in images:
        return ""
    data = base64.b64encode(images[name]).decode("ascii")
    return f'<p><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></p>'


def render_html(inputs: ReportInputs, images: dict[str, bytes], card: list[Block]) -> str:
    """``report.html``: every section of :data:`SECTIONS`, plots from ``images`` (PNG name -> bytes)."""
    body = {key: builder(inputs, images) for key, builder in _SECTION_BUILDERS.items()}
    body["model-card"] = blocks_to_html(card)
    nav = "".join(f'<a href="#{key}">{html.escape(title)}</a>' for key, title in SECTIONS)
    sections = "\n".join(
        f'<section id="{key}"><h2>{html.escape(title)}</h2>\n{body[key]}</section>' for key, title in SECTIONS
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>kidney-edge evaluation: {html.escape(inputs.spec.arch)}</title><style>{_CSS}</style></head>"
        f"<body><h1>kidney-edge evaluation report</h1>{_meta_html(inputs)}<nav>{nav}</nav>\n{sections}\n"
        "</body></html>\n"
    )


def _meta_html(inputs: ReportInputs) -> str:
    m = inputs.metrics
    lines = [
        f"model: <code>{html.escape(inputs.model_path)}</code>",
        f"data: {html.escape(inputs.data_description)} (split <b>{html.escape(inputs.split)}</b>, "
        f"{m['n_samples']} images)",
        f"architecture {html.escape(inputs.spec.arch)}, input {inputs.spec.input_size} px, "
        f"toolkit {html.escape(inputs.spec.toolkit_version)}",
    ]
    text = '<p class="meta">' + "<br>".join(lines) + "</p>"
    warnings = list(inputs.notes)
    if inputs.phantom_data:
        warnings.insert(
            0, "Synthetic phantom data: these figures test the pipeline, not clinical performance."
        )
    warnings.append("Research tool. Not for diagnosis.")
    return text + "".join(f'<p class="warn">{html.escape(w)}</p>' for w in warnings)


def _headline_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    m = inputs.metrics
    return (
        f"<p>Labels {html.escape(headline_caption(m))} (the labels predict writes). 95% intervals: "
        f"stratified bootstrap, 1,000 resamples, seed 0.{html.escape(interval_note(m))}</p>"
        + _table(headline_header(m), headline_rows(m))
        + "<h3>Per class (one-vs-rest)</h3>"
        + _table(PER_CLASS_HEADER, per_class_rows(m))
    )


def _operating_point_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    rows = rule_comparison_rows(inputs.metrics)
    rule = inputs.metrics.get("decision_rule") or {"kind": "argmax"}
    text = f"<p>{html.escape(operating_point_text(rule, inputs.metrics))}</p>"
    if not rows:
        return text
    return text + _table(RULE_COMPARISON_HEADER, rows)


def _confusion_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    return _img(images, CONFUSION_PNG, "confusion matrix under argmax") + _img(
        images, CONFUSION_RULE_PNG, "confusion matrix under the decision rule"
    )


def _training_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    if TRAINING_CURVES_PNG in images:
        return (
            f"<p>From {HISTORY_FILE}; a dashed line marks the phase change, a star the epoch saved as "
            f"{BEST_CHECKPOINT}.</p>" + _img(images, TRAINING_CURVES_PNG, "training curves")
        )
    return f"<p>No {HISTORY_FILE}: this evaluation is not part of a training run.</p>"


def _roc_pr_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    return _img(images, ROC_PR_PNG, "ROC and precision-recall curves")


def _calibration_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    m = inputs.metrics
    calibration = m.get("calibration", {})
    rows = [
        [
            "ECE (15 bins)",
            format_number(calibration.get("ece_before")),
            format_number(calibration.get("ece_after")),
        ],
        ["NLL", format_number(calibration.get("nll_before")), format_number(calibration.get("nll_after"))],
    ]
    return (
        f"<p>Temperature T = {m.get('temperature', 1.0):.4f} (fitted on the validation split; "
        "probabilities are softmax(logits / T)).</p>"
        + _table(["", "T = 1", f"T = {m.get('temperature', 1.0):.3f}"], rows)
        + _img(images, RELIABILITY_PNG, "reliability diagrams")
    )


def _audit_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    audit = inputs.audit
    if not audit:
        return f"<p>No split audit ({SPLITS_AUDIT_FILE}) available for this data.</p>"
    parts = [_table(["check", "result"], audit_summary(audit), css_class="text")]
    counts = audit.get("counts")
    if isinstance(counts, dict) and all(isinstance(v, dict) for v in counts.values()):
        classes = ordered_classes(list(next(iter(counts.values()), {})), inputs.spec.positive_class)
        rows = [[split, *(str(per_class.get(c, "")) for c in classes)] for split, per_class in counts.items()]
        parts.append("<h3>Images per split and class</h3>" + _table(["split", *classes], rows))
    leak = audit.get("leak")
    if isinstance(leak, dict) and all(isinstance(v, dict) for v in leak.values()):
        columns = list(next(iter(leak.values()), {}))
        rows = [[split, *(str(values.get(c, "")) for c in columns)] for split, values in leak.items()]
        header = ["split", *(c.replace("_", " ") for c in columns)]
        parts.append("<h3>Leakage into val/test</h3>" + _table(header, rows))
    parts.append(
        f"<details><summary>full audit ({SPLITS_AUDIT_FILE})</summary><pre>"
        + html.escape(truncate(json.dumps(audit, indent=2, default=str), 8000))
        + "</pre></details>"
    )
    return "\n".join(parts)


def _errors_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    if not inputs.gallery:
        return (
            "<p>No misclassified images.</p>" if not inputs.gallery_note else f"<p>{inputs.gallery_note}</p>"
        )
    rows = [
        [f"#{i + 1}", item.true_label, item.predicted_label, f"{item.confidence:.3f}", str(item.path)]
        for i, item in enumerate(inputs.gallery)
    ]
    note = f"<p>{html.escape(inputs.gallery_note)}</p>" if inputs.gallery_note else ""
    return (
        note
        + _img(images, ERROR_GALLERY_PNG, "misclassified images with Grad-CAM")
        + _table(["", "true", "predicted", "p(predicted)", "file"], rows, css_class="text")
    )


def _per_series_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    from kidney_edge.series_eval import per_series_html

    return per_series_html(inputs.metrics.get("series"), inputs.spec)


_SECTION_BUILDERS: dict[str, Callable[[ReportInputs, dict[str, bytes]], str]] = {
    "headline": _headline_html,
    "operating-point": _operating_point_html,
    "confusion": _confusion_html,
    "training": _training_html,
    "roc-pr": _roc_pr_html,
    "calibration": _calibration_html,
    "split-audit": _audit_html,
    "errors": _errors_html,
    "per-series": _per_series_html,
}
