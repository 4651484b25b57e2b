"""The model card as blocks (headings, paragraphs, lists, the spec JSON), rendered as
``model_card.md`` and as the HTML report's last section.
"""

from __future__ import annotations

import html
from typing import Any

from kidney_edge.report.figures import (
    audit_summary,
    format_intervals,
    format_number,
    headline_block,
    headline_caption,
    operating_point_text,
    ordered_classes,
)
from kidney_edge.report.inputs import ReportInputs

Block = tuple[str, Any]  # ("h1"|"h2"|"p"|"pre"|"ul", text or list of texts)


def model_card_blocks(inputs: ReportInputs) -> list[Block]:
    """The model card: intended use, model, data and split, metrics, operating point, known limits, spec."""
    spec, metrics = inputs.spec, inputs.metrics
    rule = metrics.get("decision_rule") or {"kind": "argmax"}
    limits = [
        "Classifies single 2-D CT slices; it sees no volume, no contrast phase, no prior studies.",
        "Test figures come from one split of one dataset; performance on other scanners, protocols "
        "and populations is unknown until measured there.",
        "Confidence intervals cover resampling of this test set only, not a change of site or time.",
    ]
    if inputs.phantom_data:
        limits.insert(
            0,
            "Evaluated on synthetic phantom slices, not patient scans (a model trained by the demo "
            "or on phantoms has never seen a patient): these figures say the pipeline works, not "
            "that the model detects disease.",
        )
    block = headline_block(metrics)
    recall = [
        f"recall {c} {format_number(block['per_class'][c]['recall'])} {format_intervals(block, f'recall_{c}')} "
        f"(n={block['per_class'][c]['support']})"
        for c in ordered_classes(metrics["labels"], metrics["positive_class"])
    ]
    return [
        ("h1", f"Model card: {spec.arch} ({', '.join(spec.class_names)})"),
        ("h2", "Intended use"),
        (
            "p",
            "Research and edge-deployment engineering: measuring and reproducing a kidney CT slice "
            "classifier from training to a CPU-only runtime. Not a medical device and not for "
            "diagnosis or any clinical decision.",
        ),
        ("h2", "Model"),
        (
            "ul",
            [
                f"architecture {spec.arch}, input {spec.input_size} px, region {spec.region.value}: {spec.region.description}, "
                f"resize {spec.resize.value}, colour {spec.color_mode.value}",
                f"classes (index order): {', '.join(spec.class_names)}",
                f"calibration temperature {spec.temperature:.4f}",
                f"toolkit version {spec.toolkit_version}",
                f"artifact: {inputs.model_path}",
            ],
        ),
        ("h2", "Data and split"),
        (
            "ul",
            [
                f"evaluated on: {inputs.split} split of {inputs.data_description}"
                if inputs.data_description.endswith(".csv")
                else f"evaluated on: {inputs.data_description}",
                f"{metrics['n_samples']} items, support per class: "
                + ", ".join(f"{c} {block['per_class'][c]['support']}" for c in metrics["labels"]),
                f"training data fingerprint: {spec.data_fingerprint or 'unknown'}",
                *_audit_lines(inputs.audit),
            ],
        ),
        ("h2", f"Metrics {headline_caption(metrics)} (95% stratified bootstrap CIs, 1,000 resamples)"),
        (
            "ul",
            [
                *recall,
                f"macro-F1 {format_number(block['macro_f1'])} {format_intervals(block, 'macro_f1')}",
                f"accuracy {format_number(block['accuracy'])} {format_intervals(block, 'accuracy')}",
                f"expected calibration error {format_number(block['ece'])} after temperature scaling",
            ],
        ),
        ("h2", "Operating point"),
        ("p", operating_point_text(rule, metrics)),
        ("h2", "Known limits"),
        ("ul", limits),
        ("h2", "Spec (preprocessing, calibration and decision rule, as stored in the model)"),
        ("pre", spec.to_json()),
    ]


_CARD_AUDIT_KEYS = ("mode", "n_images", "leaked_images", "groups")  # the card stays short


def _audit_lines(audit: dict[str, Any] | None) -> list[str]:
    if not audit:
        return ["no split audit available"]
    shown = {key: audit[key] for key in _CARD_AUDIT_KEYS if key in audit}
    return [f"split audit: {check}: {result}" for check, result in audit_summary(shown)]


def blocks_to_markdown(blocks: list[Block]) -> str:
    """The card as Markdown (``model_card.md``)."""
    lines: list[str] = []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            lines += ["#" * int(kind[1]) + " " + content, ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "pre":
            lines += ["```json", content, "```", ""]
        else:
            lines += [f"- {item}" for item in content] + [""]
    return "\n".join(lines)


def blocks_to_html(blocks: list[Block]) -> str:
    """The card as the HTML report's section (its title heading left to the section)."""
    parts = []
    for kind, content in blocks:
        if kind == "h1":
            continue  # the section has its own heading
        if kind == "h2":
            parts.append(f"<h3>{html.escape(content)}</h3>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(content)}</p>")
        elif kind == "pre":
            parts.append(f"<details><summary>spec JSON</summary><pre>{html.escape(content)}</pre></details>")
        else:
            parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in content) + "</ul>")
    return "\n".join(parts)
