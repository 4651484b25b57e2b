"""Writing a report: the plots, ``report.html``, ``report.md`` and ``model_card.md`` into one folder."""

from __future__ import annotations

import logging
from pathlib import Path

from kidney_edge.io_utils import atomic_write_bytes, atomic_write_text
from kidney_edge.layout import (
    MODEL_CARD_FILE,
    REPORT_HTML_FILE,
    REPORT_MD_FILE,
)
from kidney_edge.report.card import blocks_to_markdown, model_card_blocks
from kidney_edge.report.html_page import render_html
from kidney_edge.report.inputs import ReportFiles, ReportInputs
from kidney_edge.report.markdown import render_markdown
from kidney_edge.report.plots import render_plots

log = logging.getLogger(__name__)


def write_report(out_dir: Path, inputs: ReportInputs) -> ReportFiles:
    """Render the plots, report.html, report.md and model_card.md into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = render_plots(inputs)
    for name, png in images.items():
        atomic_write_bytes(out_dir / name, png)
    card = model_card_blocks(inputs)
    html_path, md_path, card_path = (
        out_dir / REPORT_HTML_FILE,
        out_dir / REPORT_MD_FILE,
        out_dir / MODEL_CARD_FILE,
    )
    atomic_write_text(html_path, render_html(inputs, images, card))
    atomic_write_text(md_path, render_markdown(inputs))
    atomic_write_text(card_path, blocks_to_markdown(card))
    log.info("report written to %s", html_path)
    return ReportFiles(html_path, md_path, card_path, tuple(out_dir / n for n in images))
