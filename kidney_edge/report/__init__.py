"""The evaluation report: PNG plots, one self-contained ``report.html``, ``report.md``, ``model_card.md``.

The HTML embeds every plot as a base64 PNG data URI and carries its own CSS, so it opens
offline from an e-mail attachment. Plots use matplotlib's object API (``Figure``), never
pyplot, so there is no global figure state and no display backend.

Order follows how clinicians judge the model: per-class recall (the spec's positive class,
Tumor, first), macro-F1, precision, then accuracy, each with a 95% bootstrap interval. Headline
figures are those of the labels that predict writes (metrics.json's ``rule`` block), and say so.

Modules: :mod:`~kidney_edge.report.inputs` (what a report shows), :mod:`~kidney_edge.report.figures`
(figures in words, shared by every format), :mod:`~kidney_edge.report.plots` (PNGs),
:mod:`~kidney_edge.report.card` (the model card), :mod:`~kidney_edge.report.html_page`,
:mod:`~kidney_edge.report.markdown` and :mod:`~kidney_edge.report.writer` (:func:`write_report`).
This package re-exports their public names.
"""

from kidney_edge.report.card import Block, blocks_to_markdown, model_card_blocks
from kidney_edge.report.figures import (
    PER_CLASS_HEADER,
    RULE_COMPARISON_HEADER,
    audit_summary,
    headline_block,
    headline_caption,
    headline_header,
    headline_rows,
    interval_note,
    ordered_classes,
    per_class_rows,
    rule_comparison_rows,
)
from kidney_edge.report.html_page import SECTIONS, render_html
from kidney_edge.report.inputs import GALLERY_LIMIT, GalleryItem, ReportFiles, ReportInputs
from kidney_edge.report.markdown import render_markdown
from kidney_edge.report.plots import (
    plot_confusion,
    plot_gallery,
    plot_history,
    plot_reliability,
    plot_roc_pr,
    read_history,
)
from kidney_edge.report.writer import write_report

__all__ = [
    "GALLERY_LIMIT",
    "PER_CLASS_HEADER",
    "RULE_COMPARISON_HEADER",
    "SECTIONS",
    "Block",
    "GalleryItem",
    "ReportFiles",
    "ReportInputs",
    "audit_summary",
    "blocks_to_markdown",
    "headline_block",
    "headline_caption",
    "headline_header",
    "headline_rows",
    "interval_note",
    "model_card_blocks",
    "ordered_classes",
    "per_class_rows",
    "plot_confusion",
    "plot_gallery",
    "plot_history",
    "plot_reliability",
    "plot_roc_pr",
    "read_history",
    "render_html",
    "render_markdown",
    "rule_comparison_rows",
    "write_report",
]
