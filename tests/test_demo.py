"""`kidney-edge demo --quick` end to end: every artifact it promises, with sane numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kidney_edge.cli import app
from kidney_edge.demo import QUICK

runner = CliRunner()


@pytest.mark.slow  # the suite's longest test (minutes): .ci/run runs it as its own step
def test_quick_demo_produces_every_artifact(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for relative in ("data/kidneyData.csv", "holdout/kidneyData.csv", "splits.csv", "splits_audit.json",
                     "run/best.pt", "run/history.csv", "run/metrics.json", "run/report.html", "run/report.md",
                     "run/model_card.md", "export/model.onnx", "export/parity.json",
                     "holdout_predictions.csv", "benchmark.json", "demo_summary.json"):  # fmt: skip
        assert (out / relative).is_file(), relative
    summary = json.loads((out / "demo_summary.json").read_text())
    assert list(summary["stages"]) == ["synth", "split", "train", "export", "predict", "foreign", "benchmark"]
    assert all(seconds >= 0 for seconds in summary["stages"].values())
    assert summary["parity"]["argmax_agreement"] == 1.0 and summary["parity"]["max_abs_diff"] < 1e-4
    audit = json.loads((out / "splits_audit.json").read_text())
    assert audit["leaked_images"] == 0
    metrics = json.loads((out / "run/metrics.json").read_text())
    assert 0.0 <= metrics["rule"]["accuracy"] <= 1.0 and set(metrics["rule"]["per_class"]) == {
        "Cyst",
        "Normal",
        "Stone",
        "Tumor",
    }
    for decision, verdicts in (("argmax", "targets_met"), ("rule", "targets_met_under_rule")):
        figures = summary["headline"][decision]
        assert figures["accuracy"] == metrics[decision]["accuracy"]
        assert figures["tumor_recall"] == metrics[decision]["per_class"]["Tumor"]["recall"]
        for key, ok in summary[verdicts].items():  # the verdicts follow the printed figures
            assert ok == (figures[key] >= summary["targets"][key])
    # The rule only adds Tumor calls: its recall is never below argmax's, on test and hold-out.
    for figures in (summary["headline"], summary["holdout"]):
        assert figures["rule"]["tumor_recall"] >= figures["argmax"]["tumor_recall"]
    assert "targets (>= 97%) on the test split under argmax" in result.output
    with open(out / "run/history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    for phase in ("head", "finetune"):  # what fine-tuning adds to the head alone, from the history
        best = max(float(row["val_macro_f1"]) for row in history if row["phase"] == phase)
        assert abs(summary["phase_val_macro_f1"][phase] - best) < 1e-4
    with open(out / "holdout_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == QUICK.n_holdout and not any(row["error"] for row in rows)
    assert summary["holdout"]["images"] == QUICK.n_holdout
    assert summary["holdout"]["unknown"] == sum(row["label"] == "unknown" for row in rows)
    # The run's OOD detector travels with the model: every foreign file is scored or an error row.
    assert (out / "run/ood.npz").is_file() and summary["parity"]["ood"]["method"] == "block_stats"
    with open(out / "foreign_predictions.csv", newline="") as handle:
        foreign = list(csv.DictReader(handle))
    assert all(row["ood_score"] or row["error"] for row in foreign)
    counted = sum(summary["foreign"]["labels"].values()) + summary["foreign"]["failed"]
    assert counted == summary["foreign"]["images"] == len(foreign) >= 50
    assert summary["foreign"]["labels"]["unknown"] == sum(row["label"] == "unknown" for row in foreign)
    assert "foreign inputs" in result.output
    assert "Recall Tumor" in result.output and "Wall time per stage" in result.output


def test_demo_refuses_to_overwrite_without_the_flag(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("earlier work")
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "keep.txt").read_text() == "earlier work"
