"""The evaluation report: PNG plots, one self-contained ``report.html``, ``report.md``, ``model_card.md``.

The HTML embeds every plot as a base64 PNG data URI and carries its own CSS, so it opens
offline from an e-mail attachment. Plots use matplotlib's object API (``Figure``), never
pyplot, so there is no global figure state and no display backend.

Order follows how clinicians judge the model: per-class recall (the spec's positive class,
Tumor, first), macro-F1, precision, then accuracy, each with a 95% bootstrap interval. Headline
figures are those of the labels that predict writes (metrics.json's ``rule`` block), and say so.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.io_utils import atomic_write_bytes, atomic_write_text
from kidney_edge.layout import (
    BEST_CHECKPOINT,
    HISTORY_FILE,
    MODEL_CARD_FILE,
    REPORT_HTML_FILE,
    REPORT_MD_FILE,
    SPLITS_AUDIT_FILE,
)
from kidney_edge.spec import ModelSpec

log = logging.getLogger(__name__)

GALLERY_LIMIT = 12
PNG_DPI = 110


@dataclass(frozen=True)
class GalleryItem:
    """One misclassified image: the resized input and, when available, its Grad-CAM overlay."""

    path: Path
    true_label: str
    predicted_label: str
    confidence: float  # probability of the (wrong) predicted class
    image: Any  # PIL.Image at the model's input size
    overlay: Any | None = None  # PIL.Image RGB heatmap overlay, None when Grad-CAM is unavailable


@dataclass(frozen=True)
class ReportInputs:
    """What the report shows. ``metrics`` is the content of metrics.json."""

    spec: ModelSpec
    metrics: dict[str, Any]
    y_true: np.ndarray  # (N,) true class indices
    probabilities: np.ndarray  # (N, C) calibrated probabilities (the spec's temperature)
    model_path: str
    data_description: str
    split: str
    history_csv: Path | None = None
    audit: dict[str, Any] | None = None
    gallery: Sequence[GalleryItem] = ()
    gallery_note: str = ""
    phantom_data: bool = False
    notes: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    model_card: Path
    images: tuple[Path, ...]


def write_report(out_dir: Path, inputs: ReportInputs) -> ReportFiles:
    """Render the plots, report.html, report.md and model_card.md into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _render_plots(inputs)
    for name, png in images.items():
        atomic_write_bytes(out_dir / name, png)
    card = model_card_blocks(inputs)
    html_path, md_path, card_path = out_dir / REPORT_HTML_FILE, out_dir / REPORT_MD_FILE, out_dir / MODEL_CARD_FILE
    atomic_write_text(html_path, render_html(inputs, images, card))
    atomic_write_text(md_path, render_markdown(inputs))
    atomic_write_text(card_path, blocks_to_markdown(card))
    log.info("report written to %s", html_path)
    return ReportFiles(html_path, md_path, card_path, tuple(out_dir / n for n in images))


# --------------------------------------------------------------------------- ordering and numbers


def ordered_classes(class_names: Sequence[str], positive_class: str | None) -> list[str]:
    """The positive class first (a missed one costs most), then the rest in spec order."""
    return sorted(class_names, key=lambda name: name != positive_class)


def headline_block(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics block headlines show (``metrics["headline"]``: the spec's rule)."""
    return metrics[metrics["headline"]]


def headline_caption(metrics: dict[str, Any]) -> str:
    """Which labels the headline figures are of, in words."""
    return f"under the decision rule: {metrics['decision_rule']['description']}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(interval: Sequence[float] | None) -> str:
    return "n/a" if not interval else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


HEADLINE_HEADER = ("figure", "value", "95% CI", "n")


def headline_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, 95% CI, n) rows of the headline block: recall per class (positive class
    first), macro-F1, precision, accuracy.

    ``n`` is what the figure is a fraction of (class support for recall, predictions of the
    class for precision): a reader needs it to judge an interval from a handful of images.
    """
    block = headline_block(metrics)
    ci, per_class = block.get("ci", {}), block["per_class"]
    classes = ordered_classes(metrics["labels"], metrics["positive_class"])
    total = str(metrics["n_samples"])

    def per_class_figure(figure: str, n_key: str) -> list[tuple[str, str, str, str]]:
        return [
            (f"{figure.capitalize()} {c}", _fmt(per_class[c][figure]), _fmt_ci(ci.get(f"{figure}_{c}")),
             str(per_class[c][n_key]))
            for c in classes
        ]  # fmt: skip

    rows = per_class_figure("recall", "support")
    rows.append(("Macro-F1", _fmt(block["macro_f1"]), _fmt_ci(ci.get("macro_f1")), total))
    rows += per_class_figure("precision", "predicted")
    rows.append(("Accuracy", _fmt(block["accuracy"]), _fmt_ci(ci.get("accuracy")), total))
    rows.append(("Balanced accuracy", _fmt(block["balanced_accuracy"]), "", total))
    return rows


def per_class_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One-vs-rest figures per class of the headline block."""
    block, rows = headline_block(metrics), []
    for name in ordered_classes(metrics["labels"], metrics["positive_class"]):
        m = block["per_class"][name]
        keys = ("precision", "recall", "specificity", "f1", "roc_auc", "average_precision")
        rows.append([name, str(m["support"]), *(_fmt(m[k]) for k in keys)])
    return rows


PER_CLASS_HEADER = ["class", "support", "precision", "recall", "specificity", "F1", "ROC-AUC", "AP"]


def rule_comparison_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """argmax vs the decision rule: the positive recall gained and what it costs elsewhere.

    Empty under an argmax rule, where the two blocks are equal.
    """
    if metrics["decision_rule"]["kind"] == "argmax":
        return []
    argmax, rule = metrics["argmax"], metrics["rule"]
    rows = []
    for name in ordered_classes(metrics["labels"], metrics["positive_class"]):
        for key in ("recall", "precision", "specificity"):
            before, after = argmax["per_class"][name][key], rule["per_class"][name][key]
            rows.append([f"{key.capitalize()} {name}", _fmt(before), _fmt(after), _delta(before, after)])
    for key, label in (("macro_f1", "Macro-F1"), ("accuracy", "Accuracy")):
        rows.append([label, _fmt(argmax[key]), _fmt(rule[key]), _delta(argmax[key], rule[key])])
    return rows


RULE_COMPARISON_HEADER = ("figure", "argmax", "rule", "change")


def _delta(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    return f"{after - before:+.3f}"


# --------------------------------------------------------------------------- plots


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PNG_DPI)
    return buffer.getvalue()


def _render_plots(inputs: ReportInputs) -> dict[str, bytes]:
    """PNG name -> bytes, in report order; plots without data are left out."""
    metrics = inputs.metrics
    plots: dict[str, bytes] = {"confusion_matrix.png": plot_confusion(metrics["argmax"], "argmax")}
    rule = metrics["decision_rule"]
    if rule["kind"] != "argmax":
        title = f"rule: {rule['positive_class']} also at p >= {rule['threshold']:.3f}"
        plots["confusion_matrix_rule.png"] = plot_confusion(metrics["rule"], title)
    history = read_history(inputs.history_csv) if inputs.history_csv else None
    if history:
        plots["training_curves.png"] = plot_history(history)
    plots["roc_pr.png"] = plot_roc_pr(
        inputs.y_true, inputs.probabilities, inputs.spec.class_names, inputs.spec.positive_class
    )
    plots["reliability.png"] = plot_reliability(metrics)
    if inputs.gallery:
        plots["error_gallery.png"] = plot_gallery(inputs.gallery)
    return plots


def plot_confusion(metrics: dict[str, Any], rule_title: str) -> bytes:
    from matplotlib.figure import Figure

    labels = metrics["labels"]
    counts = np.asarray(metrics["confusion_matrix"])
    normalised = np.asarray(metrics["confusion_matrix_normalized"])
    figure = Figure(figsize=(9, 4.4))
    # Fixed margins: automatic layout engines re-measure every text and cost seconds per plot.
    figure.subplots_adjust(left=0.09, right=0.98, bottom=0.2, top=0.86, wspace=0.35)
    for axis_index, (matrix, title, fmt) in enumerate(
        ((counts, "counts", "d"), (normalised, "row-normalised (recall on the diagonal)", ".2f"))
    ):
        ax = figure.add_subplot(1, 2, axis_index + 1)
        shown = normalised  # colour by row share in both panels, so big classes do not swamp
        ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(
                j,
                i,
                format(value, fmt),
                ha="center",
                va="center",
                color="white" if shown[i, j] > 0.6 else "black",
            )
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}\n{rule_title}", fontsize=10)
    return _png(figure)


def read_history(path: Path) -> dict[str, list] | None:
    """history.csv -> column -> values (numbers where they parse); None if missing or empty."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None
    return {column: [_number(row.get(column)) for row in rows] for column in rows[0]}


def _number(text: str | None) -> float | str | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _numeric(values: list) -> bool:
    return any(isinstance(v, float) for v in values) and all(
        v is None or isinstance(v, float) for v in values
    )


def plot_history(history: dict[str, list]) -> bytes:
    """Loss curves, quality curves (F1, accuracy, recall...) and the learning rate, per epoch.

    Epochs are numbered through all phases; a dashed line marks a phase change and a star
    the epoch whose checkpoint became best.pt (the last row flagged ``best``).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = len(next(iter(history.values())))
    x = np.arange(1, steps + 1)
    # Bookkeeping columns are numbers too, but not curves.
    skip = {"epoch", "step", "global_epoch", "phase", "phase_epoch", "seconds", "time", "wall_s", "best"}
    numeric = {k: v for k, v in history.items() if _numeric(v) and k not in skip}
    groups = {
        "loss": [k for k in numeric if "loss" in k],
        "learning rate": [k for k in numeric if k == "lr" or "learning_rate" in k or k.startswith("lr_")],
    }
    used = {k for keys in groups.values() for k in keys}
    groups["validation / training scores"] = [k for k in numeric if k not in used and "time" not in k]
    groups = {title: keys for title, keys in groups.items() if keys}
    best = _best_epoch(history.get("best"))
    figure = Figure(figsize=(4.2 * max(1, len(groups)), 3.6))
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.9, wspace=0.3)
    for index, (title, keys) in enumerate(groups.items()):
        ax = figure.add_subplot(1, len(groups), index + 1)
        for key in keys:
            y = np.array([np.nan if v is None else v for v in numeric[key]], dtype=float)
            ax.plot(x, y, marker="o", markersize=3, label=key)
            if best is not None and key == "val_macro_f1":
                ax.plot(
                    [best + 1],
                    [y[best]],
                    marker="*",
                    markersize=12,
                    color="black",
                    linestyle="",
                    label=BEST_CHECKPOINT,
                )
            # A schedule that decays to 0 cannot go on a log axis.
            if title == "learning rate" and np.nanmin(y) > 0:
                ax.set_yscale("log")
        _mark_phases(ax, history.get("phase"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (all phases)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(figure)


def _best_epoch(flags: list | None) -> int | None:
    """Row index of the last epoch flagged best (True/1/"True"), or None."""
    if not flags:
        return None
    rows = [i for i, flag in enumerate(flags) if str(flag).strip().lower() in ("true", "1", "1.0", "yes")]
    return rows[-1] if rows else None


def _mark_phases(ax: Any, phases: list | None) -> None:
    """A dashed line where the phase changes (frozen backbone -> fine-tuning)."""
    if not phases:
        return
    for index in range(1, len(phases)):
        if phases[index] != phases[index - 1]:
            ax.axvline(index + 0.5, color="grey", linestyle="--", linewidth=1)


def plot_roc_pr(
    y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], positive_class: str | None
) -> bytes:
    """One-vs-rest ROC and precision-recall curves per class; classes absent from y_true are skipped."""
    from matplotlib.figure import Figure
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    figure = Figure(figsize=(10, 4.2))
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.22)
    roc_ax, pr_ax = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for name in ordered_classes(class_names, positive_class):
        k = list(class_names).index(name)
        positive = np.asarray(y_true) == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probabilities[:, k])
        roc_ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(positive, probabilities[:, k])
        pr_ax.step(recall, precision, where="post", label=f"{name} (prevalence {positive.mean():.2f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc_ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (recall)")
    pr_ax.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02))
    roc_ax.set_title("ROC, one-vs-rest", fontsize=10)
    pr_ax.set_title("precision-recall, one-vs-rest", fontsize=10)
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is roc_ax else "lower left")
    return _png(figure)


def plot_reliability(metrics: dict[str, Any]) -> bytes:
    """Reliability diagrams before and after temperature scaling, with their ECE."""
    from matplotlib.figure import Figure

    calibration = metrics.get("calibration", {})
    panels = [
        ("before temperature (T = 1)", calibration.get("reliability_before"), calibration.get("ece_before")),
        (
            f"after temperature (T = {metrics.get('temperature', 1.0):.3f})",
            metrics["argmax"].get("reliability"),
            metrics["argmax"].get("ece"),
        ),
    ]
    panels = [p for p in panels if p[1]]
    figure = Figure(figsize=(4.6 * len(panels), 4.2))
    figure.subplots_adjust(left=0.1, right=0.98, bottom=0.13, top=0.86, wspace=0.28)
    for index, (title, bins, ece) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), index + 1)
        edges = np.asarray(bins["edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        accuracy = np.array([np.nan if a is None else a for a in bins["accuracy"]])
        confidence = np.array([np.nan if c is None else c for c in bins["confidence"]])
        ax.bar(centres, np.nan_to_num(accuracy), width=width * 0.95, color="#4c72b0", label="accuracy")
        # The gap to perfect calibration, drawn hatched and unfilled so it reads the same
        # whether the bin is over- (gap above) or under-confident (gap inside the bar).
        low, high = np.fmin(accuracy, confidence), np.fmax(accuracy, confidence)
        ax.bar(
            centres,
            np.nan_to_num(high - low),
            bottom=np.nan_to_num(low),
            width=width * 0.95,
            fill=False,
            hatch="///",
            edgecolor="#c44e52",
            linewidth=0.8,
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-class probability)", ylabel="accuracy")
        ax.set_title(f"{title}\nECE {_fmt(ece)}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    return _png(figure)


GALLERY_TILE = 224  # px per panel; small inputs are upscaled so a 64 px model's errors stay visible


def plot_gallery(items: Sequence[GalleryItem], columns: int = 2) -> bytes:
    """Misclassified images as one PNG: input (left) and Grad-CAM overlay (right) per item.

    Composed with Pillow, not matplotlib: a dozen image panels laid out by matplotlib cost
    seconds, a paste costs microseconds.
    """
    from PIL import Image, ImageDraw, ImageFont

    tile, caption, gap = GALLERY_TILE, 22, 12
    rows = (len(items) + columns - 1) // columns
    item_w, item_h = 2 * tile + 4, tile + caption
    sheet = Image.new("RGB", (columns * item_w + (columns - 1) * gap, rows * (item_h + gap) - gap), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    for index, item in enumerate(items):
        left = (index % columns) * (item_w + gap)
        top = (index // columns) * (item_h + gap)
        title = f"#{index + 1} true {item.true_label} -> {item.predicted_label} (p={item.confidence:.2f})"
        draw.text((left + 2, top + 3), title, fill="black", font=font)
        for offset, image in enumerate((item.image, item.overlay)):
            if image is None:
                draw.text(
                    (left + tile + 14, top + caption + tile // 2), "no Grad-CAM", fill="grey", font=font
                )
                continue
            panel = image.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)
            sheet.paste(panel, (left + offset * (tile + 4), top + caption))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# --------------------------------------------------------------------------- model card


Block = tuple[str, Any]  # ("h1"|"h2"|"p"|"pre"|"ul", text or list of texts)


def model_card_blocks(inputs: ReportInputs) -> list[Block]:
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
        f"recall {c} {_fmt(block['per_class'][c]['recall'])} {_fmt_ci(block['ci'].get(f'recall_{c}'))} "
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
                f"architecture {spec.arch}, input {spec.input_size} px, resize {spec.resize.value}, "
                f"colour {spec.color_mode.value}",
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
                f"macro-F1 {_fmt(block['macro_f1'])} {_fmt_ci(block['ci'].get('macro_f1'))}",
                f"accuracy {_fmt(block['accuracy'])} {_fmt_ci(block['ci'].get('accuracy'))}",
                f"expected calibration error {_fmt(block['ece'])} after temperature scaling",
            ],
        ),
        ("h2", "Operating point"),
        ("p", _operating_point_text(rule, metrics)),
        ("h2", "Known limits"),
        ("ul", limits),
        ("h2", "Spec (preprocessing, calibration and decision rule, as stored in the model)"),
        ("pre", spec.to_json()),
    ]


def _operating_point_text(rule: dict[str, Any], metrics: dict[str, Any]) -> str:
    positive = rule.get("positive_class")
    note = f" ({rule['note']})" if rule.get("note") else ""
    if rule.get("kind") != "threshold":
        if positive and rule.get("target_recall") is not None:
            return (
                f"argmax over the calibrated probabilities: argmax alone reached {positive} recall "
                f"{rule['target_recall']} on the validation split, so no threshold was needed."
            )
        return "argmax over the calibrated probabilities (no operating point was chosen)."
    recall = metrics["rule"]["per_class"][positive]["recall"]
    return (
        f"{positive} is called where argmax is {positive} or p({positive}) >= {rule['threshold']:.4f}; "
        f"other images keep their argmax label, so the rule only adds {positive} calls. The threshold "
        f"was chosen on the validation split as the largest one reaching {positive} recall "
        f"{rule.get('target_recall')}{note}; on this evaluation set it gives {positive} recall "
        f"{_fmt(recall)} (argmax: {_fmt(metrics['argmax']['per_class'][positive]['recall'])})."
    )


# (audit key, how the report names it) for the leakage audit that dataset.make_splits writes.
_AUDIT_SUMMARY = (
    ("mode", "split mode"),
    ("seed", "split seed"),
    ("ratios", "train/val/test ratios"),
    ("n_images", "images split"),
    ("leaked_images", "val/test images with an exact or near twin in train"),
    ("groups", "groups (duplicates, near-duplicates, patients) kept together"),
    ("exact_duplicates", "exact duplicates"),
    ("near_duplicates", "near duplicates"),
    ("max_proportion_error", "largest class-proportion deviation from the ratios"),
    ("label_conflicts", "label conflicts"),
)


def audit_summary(audit: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(check, result) pairs: the known leakage-audit figures first, then other scalar entries."""
    if not audit:
        return []
    known = dict(_AUDIT_SUMMARY)
    rows = [(known[key], _audit_value(audit[key])) for key, _ in _AUDIT_SUMMARY if key in audit]
    rows += [
        (key, _short(value))
        for key, value in audit.items()
        if key not in known and isinstance(value, (str, int, float, bool))
    ]
    return rows


def _audit_value(value: Any) -> str:
    if isinstance(value, dict):
        # e.g. label_conflicts {"files": 0, "paths": [...]}: show the counts, not the lists
        return ", ".join(f"{k} {_short(v, 40)}" for k, v in value.items() if not isinstance(v, (list, dict)))
    return _short(value)


_CARD_AUDIT_KEYS = ("mode", "n_images", "leaked_images", "groups")  # the card stays short


def _audit_lines(audit: dict[str, Any] | None) -> list[str]:
    if not audit:
        return ["no split audit available"]
    shown = {key: audit[key] for key in _CARD_AUDIT_KEYS if key in audit}
    return [f"split audit: {check}: {result}" for check, result in audit_summary(shown)]


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def blocks_to_markdown(blocks: list[Block]) -> str:
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


def _blocks_to_html(blocks: list[Block]) -> str:
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


# --------------------------------------------------------------------------- HTML and Markdown

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
    body = {key: builder(inputs, images) for key, builder in _SECTION_BUILDERS.items()}
    body["model-card"] = _blocks_to_html(card)
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
        "stratified bootstrap, 1,000 resamples, seed 0.</p>"
        + _table(HEADLINE_HEADER, headline_rows(m))
        + "<h3>Per class (one-vs-rest)</h3>"
        + _table(PER_CLASS_HEADER, per_class_rows(m))
    )


def _operating_point_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    rows = rule_comparison_rows(inputs.metrics)
    rule = inputs.metrics.get("decision_rule") or {"kind": "argmax"}
    text = f"<p>{html.escape(_operating_point_text(rule, inputs.metrics))}</p>"
    if not rows:
        return text
    return text + _table(RULE_COMPARISON_HEADER, rows)


def _confusion_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    return _img(images, "confusion_matrix.png", "confusion matrix under argmax") + _img(
        images, "confusion_matrix_rule.png", "confusion matrix under the decision rule"
    )


def _training_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    if "training_curves.png" in images:
        return (
            f"<p>From {HISTORY_FILE}; a dashed line marks the phase change, a star the epoch saved as "
            f"{BEST_CHECKPOINT}.</p>"
            + _img(images, "training_curves.png", "training curves")
        )
    return f"<p>No {HISTORY_FILE}: this evaluation is not part of a training run.</p>"


def _roc_pr_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    return _img(images, "roc_pr.png", "ROC and precision-recall curves")


def _calibration_html(inputs: ReportInputs, images: dict[str, bytes]) -> str:
    m = inputs.metrics
    calibration = m.get("calibration", {})
    rows = [
        ["ECE (15 bins)", _fmt(calibration.get("ece_before")), _fmt(calibration.get("ece_after"))],
        ["NLL", _fmt(calibration.get("nll_before")), _fmt(calibration.get("nll_after"))],
    ]
    return (
        f"<p>Temperature T = {m.get('temperature', 1.0):.4f} (fitted on the validation split; "
        "probabilities are softmax(logits / T)).</p>"
        + _table(["", "T = 1", f"T = {m.get('temperature', 1.0):.3f}"], rows)
        + _img(images, "reliability.png", "reliability diagrams")
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
        + html.escape(_short(json.dumps(audit, indent=2, default=str), 8000))
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
        + _img(images, "error_gallery.png", "misclassified images with Grad-CAM")
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
    lines += [f"Labels {headline_caption(m)}.", ""]
    lines += _md_table(HEADLINE_HEADER, headline_rows(m)) + [""]
    lines += _md_table(PER_CLASS_HEADER, per_class_rows(m)) + [""]
    comparison = rule_comparison_rows(m)
    rule = m.get("decision_rule") or {"kind": "argmax"}
    lines += ["## Operating point", "", _operating_point_text(rule, m), ""]
    if comparison:
        lines += _md_table(RULE_COMPARISON_HEADER, comparison) + [""]
    calibration = m.get("calibration", {})
    lines += [
        "## Calibration",
        "",
        f"temperature {m.get('temperature', 1.0):.4f}; ECE {_fmt(calibration.get('ece_before'))} "
        f"(T = 1) -> {_fmt(calibration.get('ece_after'))}",
        "",
        f"Plots, error gallery and model card: `{REPORT_HTML_FILE}`.",
        "",
    ]
    return "\n".join(lines)
