"""Series-level evaluation: truth per series, sensitivity/specificity, the validation operating
point, and evaluate's series block and per-series report section on a DICOM splits.csv."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from _factories import make_tiny_onnx  # noqa: E402

from kidney_edge.phantoms.dicom_series import SeriesPhantomConfig, synthesize_series  # noqa: E402
from kidney_edge.runtime.series import SeriesRule  # noqa: E402
from kidney_edge.series_eval import (  # noqa: E402
    SeriesResult,
    choose_series_rule,
    per_series_html,
    relabel,
    series_metrics,
    series_truth,
)
from kidney_edge.spec import DEFAULT_CLASS_NAMES, ModelSpec, RuleKind  # noqa: E402

CLASSES = DEFAULT_CLASS_NAMES  # Cyst, Normal, Stone, Tumor


def test_series_truth_is_the_positive_class_then_the_commonest_finding_then_normal() -> None:
    assert series_truth(["Normal", "Cyst", "Tumor", "Cyst"], CLASSES, "Normal", "Tumor") == "Tumor"
    assert series_truth(["Normal", "Cyst", "Stone", "Cyst"], CLASSES, "Normal", "Tumor") == "Cyst"
    assert series_truth(["Normal", "Stone", "Cyst"], CLASSES, "Normal", "Tumor") == "Cyst"  # tie: spec order
    assert series_truth(["Normal", "Normal"], CLASSES, "Normal", "Tumor") == "Normal"


def test_series_metrics_by_hand() -> None:
    truths = ["Tumor", "Tumor", "Normal", "Normal", "Cyst", "Stone"]
    labels = ["Tumor", "Normal", "Tumor", "Normal", "Cyst", None]
    metrics = series_metrics(truths, labels, CLASSES)
    assert (metrics["n_series"], metrics["n_unlabelled"], metrics["accuracy"]) == (6, 1, 3 / 5)
    tumor = metrics["per_class"]["Tumor"]
    assert (tumor["support"], tumor["predicted"], tumor["sensitivity"], tumor["specificity"]) == (
        2,
        2,
        0.5,
        2 / 3,
    )
    assert metrics["per_class"]["Stone"]["sensitivity"] is None  # its one series has no label
    assert metrics["confusion"]["Tumor"] == {"Tumor": 1, "Normal": 1}


def _result(tumor_curve: list[float], truth: str) -> SeriesResult:
    tumor = np.asarray(tumor_curve)
    probabilities = np.stack([np.zeros_like(tumor), 1 - tumor, np.zeros_like(tumor), tumor], axis=1)
    return SeriesResult({}, truth, probabilities, [f"s{i}" for i in range(len(tumor))], [truth] * len(tumor))


def test_the_series_operating_point_is_chosen_on_validation_series_like_the_slice_rule() -> None:
    # Top-2 means: tumours 0.45 and 0.8, normals 0.05 and 0.3. Argmax misses the 0.45 tumour.
    results = [
        _result([0.0, 0.5, 0.4, 0.0], "Tumor"),
        _result([0.9, 0.7, 0.0, 0.0], "Tumor"),
        _result([0.1, 0.0, 0.0, 0.0], "Normal"),
        _result([0.3, 0.3, 0.0, 0.1], "Normal"),
    ]
    rule = choose_series_rule(
        results, CLASSES, aggregate="topk", top_k=2, positive_class="Tumor", target_recall=1.0
    )
    assert rule.decision.kind == RuleKind.THRESHOLD
    assert rule.decision.threshold == pytest.approx((0.45 + 0.3) / 2)  # the gap's midpoint, as for slices
    _, labels = relabel(results, rule, CLASSES)
    assert labels == ["Tumor", "Tumor", "Normal", "Normal"]
    _, argmax_labels = relabel(results, SeriesRule("topk", 2), CLASSES)
    assert argmax_labels == ["Normal", "Tumor", "Normal", "Normal"]


def test_per_series_section_without_series_says_so() -> None:
    assert "No DICOM series" in per_series_html(None, ModelSpec())


def test_evaluate_reports_series_beside_slices_on_a_dicom_splits_csv(tmp_path: Path) -> None:
    from kidney_edge.evaluation import evaluate

    data = tmp_path / "series"
    config = SeriesPhantomConfig(n_series=8, seed=2, size=32, slices_per_series=(3, 4), quirks=False,
                                 class_mix=dict.fromkeys(CLASSES, 1.0))  # fmt: skip
    synthesize_series(data, config)  # 2 series per class, 1 of each in the test split
    model = make_tiny_onnx(tmp_path / "model.onnx", ModelSpec(input_size=32))
    result = evaluate(model, data / "splits.csv", split="test", out_dir=tmp_path / "eval")
    block = result.metrics["series"]
    assert block["n_series"] == 4 and block["rule"]["aggregate"] == SeriesRule().aggregate.value
    assert {name: v["support"] for name, v in block["per_class"].items()} == dict.fromkeys(CLASSES, 1)
    assert len(block["series"][0]["curve"]) == len(block["series"][0]["paths"]) >= 3
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["series"]["n_series"] == 4
    assert (tmp_path / "eval" / "series.csv").read_text().count("\n") == 5  # header + 4 series
    report = (tmp_path / "eval" / "report.html").read_text()
    assert 'id="per-series"' in report and report.count('alt="slices and probability along z"') == 4


def test_evaluate_on_slice_images_has_no_series_block(phantom_dir: Path, tmp_path: Path) -> None:
    from kidney_edge.evaluation import evaluate

    model = make_tiny_onnx(tmp_path / "model.onnx", ModelSpec(input_size=32))
    result = evaluate(model, phantom_dir, out_dir=tmp_path / "eval")
    assert "series" not in result.metrics and not (tmp_path / "eval" / "series.csv").exists()
    assert "No DICOM series" in (tmp_path / "eval" / "report.html").read_text()
