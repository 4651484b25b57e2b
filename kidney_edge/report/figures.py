"""The report's figures in words, shared by the HTML page, the Markdown summary, the model
card and the CLI's tables: class order, headline and per-class rows, argmax vs the rule, the
operating point and the split audit summary, with one number format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def ordered_classes(class_names: Sequence[str], positive_class: str | None) -> list[str]:
    """The positive class first (a missed one costs most), then the rest in spec order."""
    return sorted(class_names, key=lambda name: name != positive_class)


def headline_block(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics block headlines show (``metrics["headline"]``: the spec's rule)."""
    return metrics[metrics["headline"]]


def headline_caption(metrics: dict[str, Any]) -> str:
    """Which labels the headline figures are of, in words."""
    return f"under the decision rule: {metrics['decision_rule']['description']}"


def format_number(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals, ``n/a`` when missing."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_ci(interval: Sequence[float] | None) -> str:
    """A 95% interval as ``[low, high]``, ``n/a`` when missing."""
    return "n/a" if not interval else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def format_intervals(block: dict[str, Any], key: str) -> str:
    """``key``'s interval over images, then over patient groups where the block has them."""
    text = format_ci(block.get("ci", {}).get(key))
    if "ci_groups" in block:
        text += f" (patient groups {format_ci(block['ci_groups'].get(key))})"
    return text


HEADLINE_HEADER = ("figure", "value", "95% CI", "n")
GROUPED_HEADLINE_HEADER = ("figure", "value", "95% CI, images", "95% CI, patient groups", "n")


def headline_header(metrics: dict[str, Any]) -> tuple[str, ...]:
    """The columns of :func:`headline_rows`: a second interval where groups were resampled."""
    return GROUPED_HEADLINE_HEADER if "ci_groups" in headline_block(metrics) else HEADLINE_HEADER


def interval_note(metrics: dict[str, Any]) -> str:
    """What the second interval column draws, or nothing when there is none."""
    block = headline_block(metrics)
    if "ci_groups" not in block:
        return ""
    return (f" The patient-group intervals draw whole groups of the splits.csv ({block['n_groups']} here) "
            "within their class: read those when a patient contributes several slices.")  # fmt: skip


def headline_rows(metrics: dict[str, Any]) -> list[tuple[str, ...]]:
    """(figure, value, 95% CI, [95% CI over groups,] n) rows of the headline block: recall per
    class (positive class first), macro-F1, precision, accuracy.

    ``n`` is what the figure is a fraction of (class support for recall, predictions of the
    class for precision): a reader needs it to judge an interval from a handful of images. The
    interval over groups (present when a splits.csv named them) draws whole patients, so alike
    slices of one patient do not narrow it.
    """
    block = headline_block(metrics)
    per_class = block["per_class"]
    intervals = [block.get("ci", {})] + ([block["ci_groups"]] if "ci_groups" in block else [])
    classes = ordered_classes(metrics["labels"], metrics["positive_class"])
    total = str(metrics["n_samples"])

    def row(figure: str, value: float | None, key: str | None, n: Any) -> tuple[str, ...]:
        cis = [format_ci(ci.get(key)) if key else "" for ci in intervals]
        return (figure, format_number(value), *cis, str(n))

    rows = [row(f"Recall {c}", per_class[c]["recall"], f"recall_{c}", per_class[c]["support"]) for c in classes]
    rows.append(row("Macro-F1", block["macro_f1"], "macro_f1", total))
    rows += [row(f"Precision {c}", per_class[c]["precision"], f"precision_{c}", per_class[c]["predicted"])
             for c in classes]  # fmt: skip
    rows.append(row("Accuracy", block["accuracy"], "accuracy", total))
    rows.append(row("Balanced accuracy", block["balanced_accuracy"], None, total))
    return rows


def per_class_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One-vs-rest figures per class of the headline block."""
    block, rows = headline_block(metrics), []
    for name in ordered_classes(metrics["labels"], metrics["positive_class"]):
        m = block["per_class"][name]
        keys = ("precision", "recall", "specificity", "f1", "roc_auc", "average_precision")
        rows.append([name, str(m["support"]), *(format_number(m[k]) for k in keys)])
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
            rows.append(
                [
                    f"{key.capitalize()} {name}",
                    format_number(before),
                    format_number(after),
                    _delta(before, after),
                ]
            )
    for key, label in (("macro_f1", "Macro-F1"), ("accuracy", "Accuracy")):
        rows.append(
            [label, format_number(argmax[key]), format_number(rule[key]), _delta(argmax[key], rule[key])]
        )
    return rows


RULE_COMPARISON_HEADER = ("figure", "argmax", "rule", "change")


def _delta(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    return f"{after - before:+.3f}"


def operating_point_text(rule: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The decision rule (metrics.json's ``decision_rule``) in words, with its note."""
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
        f"{format_number(recall)} (argmax: {format_number(metrics['argmax']['per_class'][positive]['recall'])})."
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
        (key, truncate(value))
        for key, value in audit.items()
        if key not in known and isinstance(value, (str, int, float, bool))
    ]
    return rows


def _audit_value(value: Any) -> str:
    if isinstance(value, dict):
        # e.g. label_conflicts {"files": 0, "paths": [...]}: show the counts, not the lists
        return ", ".join(
            f"{k} {truncate(v, 40)}" for k, v in value.items() if not isinstance(v, (list, dict))
        )
    return truncate(value)


def truncate(value: Any, limit: int = 160) -> str:
    """``value`` (JSON unless a string) cut to ``limit`` characters, ``...`` marking a cut."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
