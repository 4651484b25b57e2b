"""The HTML/Markdown report and model card, and Grad-CAM."""

from __future__ import annotations

import base64
import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kidney_edge.evaluation import build_metrics
from kidney_edge.gradcam import grad_cam, overlay
from kidney_edge.report import GalleryItem, ReportFiles, ReportInputs, headline_rows, write_report
from kidney_edge.spec import DecisionRule, ModelSpec

SECTION_IDS = (
    "headline",
    "operating-point",
    "confusion",
    "training",
    "roc-pr",
    "calibration",
    "split-audit",
    "errors",
    "model-card",
)


def synthetic_inputs(tmp_path: Path, *, rule: bool = True, history: bool = True) -> ReportInputs:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) * 2
    logits[np.arange(200), y_true] += 3
    decision = DecisionRule("threshold", "Tumor", 0.25, 0.98) if rule else DecisionRule()
    spec = ModelSpec(input_size=64, temperature=1.3, decision_rule=decision)
    history_csv = None
    if history:
        history_csv = tmp_path / "history.csv"
        with open(history_csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["epoch", "phase", "train_loss", "val_loss", "val_macro_f1", "lr"])
            for epoch in range(6):
                writer.writerow(
                    [epoch + 1, 1 + (epoch > 2), 1 - epoch / 10, 1.1 - epoch / 12, 0.3 + epoch / 10, 1e-3]
                )
    image = Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), "L")
    heat = np.zeros((64, 64), np.float32)
    heat[:32, :32] = 1.0
    gallery = [
        GalleryItem(Path(f"Cyst/Cyst- ({i}).jpg"), "Cyst", "Tumor", 0.9, image, overlay(image, heat))
        for i in range(3)
    ]
    return ReportInputs(
        spec=spec,
        metrics=build_metrics(logits, y_true, spec),
        y_true=y_true,
        probabilities=spec.probabilities(logits),
        model_path="runs/demo/best.pt",
        data_description="splits.csv",
        split="test",
        history_csv=history_csv,
        audit={"mode": "grouped", "exact_duplicates_across_splits": 0, "groups": [{"id": 1}]},
        gallery=gallery,
        gallery_note="3 misclassified of 200",
        phantom_data=True,
    )


def embedded_pngs(html: str) -> list[Image.Image]:
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in found]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReportInputs, ReportFiles]:
    """One report with every section filled, shared by the tests that only read it (plots are slow)."""
    folder = tmp_path_factory.mktemp("report")
    inputs = synthetic_inputs(folder)
    return inputs, write_report(folder / "out", inputs)


def test_report_html_has_sections_and_embedded_images(full_report: tuple[ReportInputs, ReportFiles]) -> None:
    _, files = full_report
    html = files.html.read_text(encoding="utf-8")
    for section in SECTION_IDS:
        assert f'<section id="{section}">' in html, section
    images = embedded_pngs(html)
    # confusion (argmax + rule), training curves, ROC/PR, reliability, error gallery
    assert len(images) == 6
    assert all(image.format == "PNG" and image.size[0] > 300 for image in images)
    assert {p.name for p in files.images} == {
        "confusion_matrix.png",
        "confusion_matrix_rule.png",
        "training_curves.png",
        "roc_pr.png",
        "reliability.png",
        "error_gallery.png",
    }
    assert all(p.is_file() and p.read_bytes()[:4] == b"\x89PNG" for p in files.images)
    # Self-contained: nothing fetched from elsewhere.
    assert not re.search(r'(src|href)="(https?:|//|[^"#d])', html)
    assert "Not for diagnosis" in html and "Synthetic phantom data" in html
    assert "Intended use" in html and "Tumor threshold" not in html  # the rule came from the model


def test_headline_puts_tumor_recall_first_then_macro_f1_precision_accuracy(tmp_path: Path) -> None:
    inputs = synthetic_inputs(tmp_path)
    figures = [row[0] for row in headline_rows(inputs.metrics)]
    assert figures[:5] == ["Recall Tumor", "Recall Cyst", "Recall Normal", "Recall Stone", "Macro-F1"]
    assert figures[5] == "Precision Tumor" and figures.index("Accuracy") > figures.index("Precision Stone")
    assert inputs.metrics["headline"] == "rule"  # headlines show the labels predict writes
    rule = inputs.metrics["rule"]
    recall = rule["per_class"]["Tumor"]["recall"]
    low, high = rule["ci"]["recall_Tumor"]
    support = str(rule["per_class"]["Tumor"]["support"])
    assert recall >= inputs.metrics["argmax"]["per_class"]["Tumor"]["recall"]
    assert headline_rows(inputs.metrics)[0] == (
        "Recall Tumor",
        f"{recall:.3f}",
        f"[{low:.3f}, {high:.3f}]",
        support,
    )


def test_markdown_report_and_model_card(full_report: tuple[ReportInputs, ReportFiles]) -> None:
    inputs, files = full_report
    markdown = files.markdown.read_text(encoding="utf-8")
    assert (
        markdown.index("| Recall Tumor |") < markdown.index("| Macro-F1 |") < markdown.index("| Accuracy |")
    )
    assert "| figure | argmax | rule | change |" in markdown
    assert "Labels under the decision rule: Tumor if argmax is Tumor or p(Tumor) >= 0.2500, else argmax." in markdown
    card = files.model_card.read_text(encoding="utf-8")
    for heading in (
        "## Intended use",
        "## Data and split",
        "## Metrics",
        "## Operating point",
        "## Known limits",
    ):
        assert heading in card
    assert "not for diagnosis" in card and "synthetic phantom" in card
    assert f"region {inputs.spec.region.value}: {inputs.spec.region.description}," in card
    assert "p(Tumor) >= 0.2500" in card and "only adds Tumor calls" in card
    spec_json = card.split("```json\n")[1].split("```")[0]
    assert ModelSpec.from_json(spec_json) == inputs.spec  # the spec travels with the report
    macro = inputs.metrics["rule"]["macro_f1"]
    assert f"macro-F1 {macro:.3f} [" in card


def test_report_without_rule_history_or_errors(tmp_path: Path) -> None:
    inputs = synthetic_inputs(tmp_path, rule=False, history=False)
    inputs = ReportInputs(**{**inputs.__dict__, "gallery": (), "gallery_note": "", "audit": None})
    files = write_report(tmp_path / "out", inputs)
    html = files.html.read_text(encoding="utf-8")
    assert len(embedded_pngs(html)) == 3  # confusion, ROC/PR, reliability
    assert "No history.csv" in html and "No split audit" in html and "No misclassified images" in html
    assert "no operating point was chosen" in html
    assert not (tmp_path / "out" / "confusion_matrix_rule.png").exists()


# --------------------------------------------------------------------------- Grad-CAM


class BrightSpotNet:
    """Built lazily (torch import): conv -> ReLU -> global mean -> linear; class 0 = brightness."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.features = nn.Conv2d(3, 2, kernel_size=3, padding=1, bias=False)
                self.classifier = nn.Linear(2, 2, bias=False)
                with torch.no_grad():
                    self.features.weight.zero_()
                    self.features.weight[0] = 1.0 / 27  # channel 0: local brightness
                    self.features.weight[1] = -1.0 / 27  # channel 1: local darkness
                    self.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))

            @property
            def cam_layer(self) -> nn.Module:
                return self.features

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.classifier(torch.relu(self.features(x)).mean(dim=(2, 3)))

        return Net().eval()


@pytest.mark.parametrize("quadrant", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_grad_cam_peaks_where_the_class_evidence_is(quadrant: tuple[int, int]) -> None:
    model = BrightSpotNet.build()
    batch = np.zeros((2, 3, 32, 32), np.float32)
    row, col = quadrant
    batch[:, :, row * 16 + 4 : row * 16 + 12, col * 16 + 4 : col * 16 + 12] = 1.0  # bright square
    heatmaps = grad_cam(model, batch, np.array([0, 0]))
    assert heatmaps.shape == (2, 32, 32) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0 and heatmaps.max() == pytest.approx(1.0)
    peak_row, peak_col = np.unravel_index(heatmaps[0].argmax(), (32, 32))
    assert (peak_row // 16, peak_col // 16) == quadrant
    inside = heatmaps[0, row * 16 : row * 16 + 16, col * 16 : col * 16 + 16].sum()
    assert inside > 0.95 * heatmaps[0].sum()


def test_grad_cam_on_kidney_net_cam_layer() -> None:
    import torch

    from kidney_edge.backbones import create_model

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=4, pretrained=False).eval()
    batch = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    heatmaps = grad_cam(model, batch, np.array([0, 3, 1]))
    assert heatmaps.shape == (3, 64, 64)
    assert np.all((heatmaps >= 0) & (heatmaps <= 1.0 + 1e-6))
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was
    assert not model.training


def test_overlay_colours_only_the_hot_region() -> None:
    image = Image.new("L", (32, 32), 128)
    heat = np.zeros((32, 32), np.float32)
    heat[:16, :16] = 1.0
    blended = np.asarray(overlay(image, heat))
    assert blended.shape == (32, 32, 3)
    assert np.all(blended[20:, 20:] == 128)  # cold: original grey
    assert int(blended[4, 4, 0]) > int(blended[4, 4, 2]) + 40  # hot: the red end of the jet map
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, np.zeros((8, 8)))
