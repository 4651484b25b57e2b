"""Evaluation end to end on a tiny untrained model and the phantom set: files, numbers, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kidney_edge import metrics as M
from kidney_edge.errors import InputError, KidneyEdgeError
from kidney_edge.evaluation import evaluate, predict_files
from kidney_edge.labelled import class_indices
from kidney_edge.spec import ModelSpec
from kidney_edge.training.finalize import finalize_run

IMAGE_SIZE = 64


def save_tiny_checkpoint(
    path: Path, class_names: tuple[str, ...], train: list | None = None, seed: int = 0
) -> Path:
    """A random-init Lite0 at 64 px; with ``train`` rows, made weakly predictive in ~2 s.

    Untrained, its logits are near-constant (ties everywhere make AUCs meaningless), so its
    BatchNorm statistics are re-estimated on the training images and its linear head is fitted
    by ridge regression on the pooled features: a small but real classifier, no SGD needed.
    """
    import torch

    from kidney_edge.backbones import create_model
    from kidney_edge.checkpoint import save_checkpoint
    from kidney_edge.imaging import preprocess_batch

    torch.manual_seed(seed)
    model = create_model("efficientnet_lite0", num_classes=len(class_names), pretrained=False)
    spec = ModelSpec(class_names=class_names, input_size=IMAGE_SIZE)
    if train:
        x = torch.from_numpy(preprocess_batch([row.path for row in train], spec))  # (N, 3, 64, 64)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over this one pass
        with torch.no_grad():
            model.train().forward_features(x)
            features = model.eval().forward_features(x).mean(dim=(2, 3)).double()  # (N, F)
            mean, std = features.mean(0), features.std(0) + 1e-6
            z = (features - mean) / std
            targets = torch.zeros(len(train), len(class_names), dtype=torch.float64)
            targets[range(len(train)), [class_names.index(row.label) for row in train]] = 1.0
            weight = torch.linalg.solve(z.T @ z + 10.0 * torch.eye(z.shape[1], dtype=z.dtype), z.T @ targets)
            weight = 4.0 * weight.T / std  # (C, F), undo the standardisation; x4 spreads the logits
            model.classifier.weight.copy_(weight.float())
            model.classifier.bias.copy_((-(weight @ mean) + 4.0 * targets.mean(0)).float())
    save_checkpoint(path, model=model.eval(), spec=spec, config={"note": "test model, no SGD"})
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def splits_csv(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kidney_edge.dataset import SplitConfig, split_dataset

    out = tmp_path_factory.mktemp("splits") / "splits.csv"
    split_dataset(phantom_dir, out, SplitConfig(seed=0))
    return out


@pytest.fixture(scope="module")
def finished_run(splits_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as the trainer leaves it, then finalize_run on it."""
    from kidney_edge.dataset import read_splits, write_splits

    run = tmp_path_factory.mktemp("run")
    rows = read_splits(splits_csv)
    class_names = tuple(sorted({row.label for row in rows}))
    save_tiny_checkpoint(run / "best.pt", class_names, [row for row in rows if row.split == "train"])
    write_splits(rows, run / "splits.csv")
    (run / "splits_audit.json").write_bytes(splits_csv.with_name("splits_audit.json").read_bytes())
    with open(run / "history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "phase", "train_loss", "val_loss", "val_macro_f1", "lr"])
        writer.writerows(
            [[1, 1, 1.3, 1.35, 0.2, 1e-3], [2, 1, 1.2, 1.3, 0.3, 1e-3], [3, 2, 1.0, 1.2, 0.4, 1e-4]]
        )
    finalize_run(run, tumor_recall=0.98)
    return run


def read_predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_finalize_run_stores_calibration_and_rule_fitted_on_val(finished_run: Path, splits_csv: Path) -> None:
    from kidney_edge.checkpoint import load_checkpoint
    from kidney_edge.dataset import read_splits

    metrics = json.loads((finished_run / "metrics.json").read_text())
    stored = ModelSpec.from_dict(load_checkpoint(finished_run / "best.pt")["spec"])
    assert stored == ModelSpec.from_json((finished_run / "spec.json").read_text())
    assert stored.temperature == metrics["temperature"] == metrics["validation"]["temperature"]
    assert stored.temperature != 1.0
    rule = stored.decision_rule
    assert rule.kind in ("threshold", "argmax") and rule.positive_class == "Tumor"
    assert metrics["decision_rule"]["threshold"] == rule.threshold
    # Recompute on val. The tiny model is near chance: reaching the target recall would call
    # most other val images Tumor, so the rule stays argmax and says why.
    val = [row for row in read_splits(splits_csv) if row.split == "val"]
    logits, _ = predict_files(finished_run / "best.pt", [row.path for row in val])
    probabilities = stored.probabilities(logits)
    decided = stored.decide(probabilities)
    tumor = np.array([row.label == "Tumor" for row in val])
    recall = np.mean(decided[tumor] == stored.class_names.index("Tumor"))
    assert recall == metrics["validation"]["positive_recall_achieved"] and recall < 0.98
    assert rule.kind == "argmax" and rule.note.startswith("argmax kept: reaching Tumor recall 0.98")
    wanted = M.tumor_decision_rule(probabilities, class_indices([row.label for row in val], stored.class_names),
                                   stored.class_names, positive_class="Tumor", target_recall=0.98,
                                   max_added_false_positives=None)  # fmt: skip
    k = stored.class_names.index("Tumor")
    others = ~tumor & (decided != k)  # what a threshold would newly call Tumor, over every non-Tumor
    added = np.count_nonzero(probabilities[others, k] >= wanted.threshold) / np.count_nonzero(~tumor)
    assert added > M.MAX_ADDED_FALSE_POSITIVES and f"which would call {np.count_nonzero(probabilities[others, k] >= wanted.threshold)} of" in rule.note
    # Temperature lowers validation NLL (that is what it was fitted for).
    assert metrics["validation"]["nll_after"] <= metrics["validation"]["nll_before"]


def test_finalize_run_metrics_match_predictions_csv(finished_run: Path, splits_csv: Path) -> None:
    """Every headline figure of metrics.json, both blocks, recomputed from predictions.csv alone."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    from kidney_edge.dataset import read_splits

    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["headline"] == "rule" and metrics["argmax"].keys() == metrics["rule"].keys()
    rows = read_predictions(finished_run / "predictions.csv")
    labels = metrics["labels"]
    assert list(rows[0]) == [
        "path", "true_label", "label", "argmax_label", "confidence", *(f"p_{c}" for c in labels), "ood_score"
    ]  # fmt: skip
    test_paths = sorted(str(r.path) for r in read_splits(splits_csv) if r.split == "test")
    assert sorted(r["path"] for r in rows) == test_paths and metrics["n_samples"] == len(rows)
    probabilities = np.array([[float(r[f"p_{c}"]) for c in labels] for r in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    true = np.array([labels.index(r["true_label"]) for r in rows])
    for block, column in (("argmax", "argmax_label"), ("rule", "label")):
        figures = metrics[block]
        predicted = np.array([labels.index(r[column]) for r in rows])
        present = sorted(set(true) | set(predicted))
        assert figures["accuracy"] == np.mean(predicted == true), block
        assert figures["macro_f1"] == pytest.approx(
            f1_score(true, predicted, labels=present, average="macro", zero_division=0), abs=1e-12
        ), block
        assert (
            figures["confusion_matrix"]
            == confusion_matrix(true, predicted, labels=range(len(labels))).tolist()
        )
        precision, recall, _, support = precision_recall_fscore_support(
            true, predicted, labels=range(len(labels)), zero_division=0
        )
        for k, name in enumerate(labels):
            assert figures["per_class"][name]["recall"] == pytest.approx(recall[k], abs=1e-12), (block, name)
            assert figures["per_class"][name]["precision"] == pytest.approx(precision[k], abs=1e-12), (
                block,
                name,
            )
            assert figures["per_class"][name]["support"] == support[k]
    np.testing.assert_array_equal(
        probabilities.argmax(axis=1), [labels.index(r["argmax_label"]) for r in rows]
    )
    tumor = labels.index("Tumor")
    assert (
        metrics["rule"]["per_class"]["Tumor"]["recall"] >= metrics["argmax"]["per_class"]["Tumor"]["recall"]
    )
    assert all(r["label"] == "Tumor" for r in rows if r["argmax_label"] == "Tumor"), tumor


def test_test_split_intervals_also_resample_its_patient_groups(
    finished_run: Path, splits_csv: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    """A splits.csv names each slice's group: both blocks hold intervals over groups, the report
    shows them beside the image intervals; a plain folder has no groups and gets image intervals only."""
    from kidney_edge.dataset import read_splits
    from kidney_edge.report import headline_header, headline_rows

    metrics = json.loads((finished_run / "metrics.json").read_text())
    groups = {row.group for row in read_splits(splits_csv) if row.split == "test"}
    for block in ("argmax", "rule"):
        assert metrics[block]["n_groups"] == len(groups) > 1
        assert metrics[block]["ci_groups"].keys() == metrics[block]["ci"].keys()
    assert headline_header(metrics)[2:4] == ("95% CI, images", "95% CI, patient groups")
    assert all(len(row) == 5 for row in headline_rows(metrics))
    assert f"whole groups of the splits.csv ({len(groups)} here)" in (finished_run / "report.md").read_text()
    folder = evaluate(finished_run / "best.pt", phantom_dir, out_dir=tmp_path)
    assert "ci_groups" not in folder.metrics["rule"] and len(headline_header(folder.metrics)) == 4


def test_finalize_run_report(finished_run: Path) -> None:
    html = (finished_run / "report.html").read_text()
    for section in ("headline", "operating-point", "training", "split-audit", "errors", "model-card"):
        assert f'<section id="{section}">' in html
    # incl. training curves and gallery; one confusion matrix: the rule is argmax (see above)
    assert html.count('<img src="data:image/png;base64,') == 5
    assert "Images per split and class" in html and "Leakage into val/test" in html
    assert "Grad-CAM" in html and "Synthetic phantom data" in html
    for name in ("report.md", "model_card.md", "training_curves.png", "error_gallery.png", "roc_pr.png"):
        assert (finished_run / name).is_file(), name


def assert_close(actual: object, expected: object, where: str) -> None:
    """Nested dicts/lists equal, floats within 1e-4 (the export's own parity bound on probabilities)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=1e-4), where
    else:
        assert actual == expected, where


def export_onnx(checkpoint: Path, out_dir: Path, splits: Path) -> Path:
    from kidney_edge.export import ExportConfig, export_model

    return export_model(checkpoint, out_dir, ExportConfig(int8=False, splits=splits)).model_path


def test_checkpoint_via_cli_and_its_onnx_export_give_the_same_metrics(
    finished_run: Path, splits_csv: Path, tmp_path: Path
) -> None:
    from kidney_edge.cli import app

    onnx_path = export_onnx(finished_run / "best.pt", tmp_path / "export", splits_csv)
    from_onnx = evaluate(onnx_path, splits_csv, split="test", out_dir=tmp_path / "onnx")
    assert from_onnx.spec == ModelSpec.from_json(
        (finished_run / "spec.json").read_text()
    )  # T and rule travel
    # The checkpoint through the CLI, at another batch size, re-choosing the tumor threshold on
    # val: it must land on the threshold finalize_run stored.
    out = tmp_path / "cli"
    args = ["evaluate", str(finished_run / "best.pt"), str(splits_csv), "--split", "test", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--tumor-recall", "0.98", "--batch-size", "7"])
    assert result.exit_code == 0, result.output
    assert "Recall Tumor" in result.output and "report.html" in result.output
    from_checkpoint = json.loads((out / "metrics.json").read_text())
    assert "chosen at evaluation time" in (out / "report.html").read_text()
    # Decisions (and so every count-based figure) agree exactly; probability-based ones
    # (AUC, AP, ECE) and the threshold to float32 rounding.
    for block in ("argmax", "rule"):
        for key in ("n_samples", "accuracy", "macro_f1", "balanced_accuracy", "confusion_matrix", "ci"):
            assert from_onnx.metrics[block][key] == from_checkpoint[block][key], (block, key)
        assert_close(from_onnx.metrics[block]["per_class"], from_checkpoint[block]["per_class"], block)
    for key in ("calibration", "decision_rule", "temperature"):
        assert_close(from_onnx.metrics[key], from_checkpoint[key], key)
    pt_rows = read_predictions(out / "predictions.csv")
    onnx_rows = read_predictions(from_onnx.files["predictions"])
    labels = from_checkpoint["labels"]
    assert [r["label"] for r in pt_rows] == [r["label"] for r in onnx_rows]
    pt_p = np.array([[float(r[f"p_{c}"]) for c in labels] for r in pt_rows])
    onnx_p = np.array([[float(r[f"p_{c}"]) for c in labels] for r in onnx_rows])
    np.testing.assert_allclose(onnx_p, pt_p, atol=1e-4)
    # Grad-CAM needs PyTorch: the ONNX report says so instead of showing heatmaps.
    assert "Grad-CAM needs the PyTorch checkpoint" in from_onnx.files["report_html"].read_text()


# --------------------------------------------------------------------------- bad input


def make_folder(root: Path, classes: tuple[str, ...]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(len(classes))
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(2):  # distinct noise: identical files in two classes are a label conflict
            pixels = rng.integers(0, 255, (40, 40), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{name}- ({k}).png")
    return root


def test_model_classes_differ_from_the_data(finished_run: Path, tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", ("Cyst", "Kidney stone", "Normal"))
    with pytest.raises(InputError) as error:
        evaluate(finished_run / "best.pt", data, out_dir=tmp_path / "out")
    message = str(error.value)
    assert "Kidney stone" in message and "['Cyst', 'Normal', 'Stone', 'Tumor']" in message
    assert not (tmp_path / "out").exists()


def test_empty_split_and_missing_files(finished_run: Path, splits_csv: Path, tmp_path: Path) -> None:
    with open(splits_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    only_test = tmp_path / "only_test.csv"
    with open(only_test, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            if row["split"] == "test":
                writer.writerow({**row, "path": str((splits_csv.parent / row["path"]).resolve())})
    with pytest.raises(InputError, match=r"split 'val' of .*only_test.csv is empty.*--split"):
        evaluate(finished_run / "best.pt", only_test, split="val", out_dir=tmp_path / "out")
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label,split,group\nnowhere/Tumor- (1).jpg,Tumor,test,g1\n")
    with pytest.raises(InputError, match=r"not found.*nowhere"):
        evaluate(finished_run / "best.pt", missing, out_dir=tmp_path / "out")


def test_bad_options(finished_run: Path, splits_csv: Path, tmp_path: Path) -> None:
    model = finished_run / "best.pt"
    with pytest.raises(InputError, match="--split"):
        evaluate(model, splits_csv, split="holdout", out_dir=tmp_path)
    with pytest.raises(InputError, match="--tumor-recall"):
        evaluate(model, splits_csv, tumor_recall=1.5, out_dir=tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        evaluate(tmp_path / "nope.pt", splits_csv, out_dir=tmp_path)
    folder = make_folder(tmp_path / "data", ("Tumor",))
    with pytest.raises(InputError, match="--tumor-recall chooses a threshold on the validation split"):
        evaluate(model, folder, tumor_recall=0.98, out_dir=tmp_path)
    with pytest.raises(KidneyEdgeError, match="best.pt is missing"):
        finalize_run(tmp_path)  # no splits.csv beside best.pt (and no best.pt)


def test_run_fits_an_ood_detector_and_reports_its_rejection_rate(finished_run: Path) -> None:
    """ood.npz beside best.pt; metrics.json's rejection rate and CI recomputed from ood_score."""
    from scipy.stats import binomtest

    from kidney_edge.ood import DEFAULT_OOD_METHOD, OOD_FILE, OodDetector

    detector = OodDetector.from_bytes((finished_run / OOD_FILE).read_bytes())
    assert detector.method is DEFAULT_OOD_METHOD and detector.n_fit > 0 and detector.n_val > 0
    assert detector.val_rejection <= 0.05
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["validation"]["ood"]["threshold"] == detector.threshold
    block = metrics["ood"]
    scores = np.array([float(r["ood_score"]) for r in read_predictions(finished_run / "predictions.csv")])
    rejected = int((scores > detector.threshold).sum())
    assert block["rejected"] == rejected and block["n_images"] == len(scores)
    interval = binomtest(rejected, len(scores)).proportion_ci(0.95, method="wilson")
    assert block["rejection_ci95"] == pytest.approx([interval.low, interval.high])
