"""``report.md``: the headline figures, operating point and calibration as a short Markdown summary."""

from __future__ import annotations

from collections.abc import Sequence

from kidney_edge.layout import (
    REPORT_HTML_FILE,
)
from kidney_edge.report.figures import (
    PER_CLASS_HEADER,
    RULE_COMPARISON_HEADER,
    format_number,
    headline_caption,
    headline_header,
    headline_rows,
    interval_note,
    operating_point_text,
    per_class_rows,
    rule_comparison_rows,
)
from kidney_edge.report.inputs import ReportInputs


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def render_markdown(inputs: ReportInputs) -> str:
    """A short summary for terminals and pull requests; the HTML has the plots."""
    m = inputs.metrics
    lines = [
        "# kidney-edge evaluation",
        "",
        f"model `{inputs.model_path}` on {inputs.data_description} "
        f"(split {inputs.split}, {m['n_samples']} images)",
        "",
    ]
    if inputs.phantom_data:
        lines += ["> Synthetic phantom data: pipeline figures, not clinical performance.", ""]
    lines += [f"Labels {headline_caption(m)}.{interval_note(m)}", ""]
    lines += _md_table(headline_header(m), headline_rows(m)) + [""]
    lines += _md_table(PER_CLASS_HEADER, per_class_rows(m)) + [""]
    comparison = rule_comparison_rows(m)
    rule = m.get("decision_rule") or {"kind": "argmax"}
    lines += ["## Operating point", "", operating_point_text(rule, m), ""]
    if comparison:
        lines += _md_table(RULE_COMPARISON_HEADER, comparison) + [""]
    calibration = m.get("calibration", {})
    lines += [
        "## Calibration",
        "",
        f"temperature {m.get('temperature', 1.0):.4f}; ECE {format_number(calibration.get('ece_before'))} "
        f"(T = 1) -> {format_number(calibration.get('ece_after'))}",
        "",
        f"Plots, error gallery and model card: `{REPORT_HTML_FILE}`.",
        "",
    ]
    return "\n".join(lines)
