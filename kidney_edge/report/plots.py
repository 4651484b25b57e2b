"""The report's PNG plots, drawn with matplotlib's object API (``Figure``), never pyplot: no
global figure state and no display backend.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.layout import (
    BEST_CHECKPOINT,
)
from kidney_edge.report.figures import format_number, ordered_classes
from kidney_edge.report.inputs import GalleryItem, ReportInputs

log = logging.getLogger(__name__)

# The plots' file names in the report folder, in report order (the HTML page embeds them by name).
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_RULE_PNG = "confusion_matrix_rule.png"
TRAINING_CURVES_PNG = "training_curves.png"
ROC_PR_PNG = "roc_pr.png"
RELIABILITY_PNG = "reliability.png"
ERROR_GALLERY_PNG = "error_gallery.png"
PNG_DPI = 110


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PNG_DPI)
    return buffer.getvalue()


def render_plots(inputs: ReportInputs) -> dict[str, bytes]:
    """PNG name -> bytes, in report order; plots without data are left out."""
    metrics = inputs.metrics
    plots: dict[str, bytes] = {CONFUSION_PNG: plot_confusion(metrics["argmax"], "argmax")}
    rule = metrics["decision_rule"]
    if rule["kind"] != "argmax":
        title = f"rule: {rule['positive_class']} also at p >= {rule['threshold']:.3f}"
        plots[CONFUSION_RULE_PNG] = plot_confusion(metrics["rule"], title)
    history = read_history(inputs.history_csv) if inputs.history_csv else None
    if history:
        plots[TRAINING_CURVES_PNG] = plot_history(history)
    plots[ROC_PR_PNG] = plot_roc_pr(
        inputs.y_true, inputs.probabilities, inputs.spec.class_names, inputs.spec.positive_class
    )
    plots[RELIABILITY_PNG] = plot_reliability(metrics)
    if inputs.gallery:
        plots[ERROR_GALLERY_PNG] = plot_gallery(inputs.gallery)
    return plots


def plot_confusion(metrics: dict[str, Any], rule_title: str) -> bytes:
    """Confusion matrix of one metrics block: counts and row-normalised (recall on the diagonal)."""
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
        ax.set_title(f"{title}\nECE {format_number(ece)}", fontsize=10)
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
