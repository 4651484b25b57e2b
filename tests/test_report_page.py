"""`predict --report`: the offline triage page, its cards, strips, counts and how it is written.

The runs use the tiny CAM model (tests/_factories.py), whose class follows an image's brightness,
with a threshold rule so that a gray folder of graded brightness gets Tumor calls, uncertain rows
just under the threshold, and Cyst calls; the page is read back as HTML text.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _factories import make_cam_onnx
from test_runtime import write_gray_images

from kidney_edge.errors import InputError
from kidney_edge.runtime import OnnxClassifier, PredictOptions, classify_paths, predict_folder
from kidney_edge.runtime.predict import LocalEngine
from kidney_edge.runtime.report_page import ReportOptions, RunFacts, write_report
from kidney_edge.runtime.rows import report_path
from kidney_edge.runtime.series import SeriesOptions
from kidney_edge.runtime.triage import Group, Overlay, TriageCollector, triage
from kidney_edge.spec import DecisionRule, ModelSpec

CARD = re.compile(r'<article class="card" tabindex="0" data-label="([^"]*)" data-path="([^"]*)">')
GROUP = re.compile(r'<div class="cards" data-group="(\w+)">')


def threshold_model(folder: Path, images: list[str], quantile: float = 0.6) -> Path:
    """The CAM model with a Tumor threshold at ``quantile`` of its own p(Tumor) on ``images``."""
    plain = make_cam_onnx(folder / "plain.onnx")
    p = [row["p_Tumor"] for row in classify_paths(images, OnnxClassifier(plain, threads=1)) if row["p_Tumor"]]
    rule = DecisionRule("threshold", "Tumor", threshold=float(np.quantile(p, quantile)))
    return make_cam_onnx(folder / "model.onnx", ModelSpec(input_size=32, decision_rule=rule))


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("report")
    images = [str(p) for p in write_gray_images(root / "images", 24)]
    (root / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    model = threshold_model(root, images)
    out = root / "p.csv"
    summary = predict_folder(
        root / "images", PredictOptions(model=model, out=out, workers=1, threads=1, report=ReportOptions())
    )
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {"root": root, "model": model, "out": out, "summary": summary, "rows": rows,
            "page": report_path(out).read_text(encoding="utf-8")}  # fmt: skip


def page_counts(page: str) -> dict[str, int]:
    found = re.findall(
        r'<tr data-count-label="([^"]+)"><th scope=row>[^<]*</th><td class="count">(\d+)</td>', page
    )
    return {label: int(count) for label, count in found}


def cards_by_group(page: str) -> dict[str, list[tuple[str, str]]]:
    """group -> [(label, path)] of its cards, in page order."""
    result: dict[str, list[tuple[str, str]]] = {}
    starts = [(m.start(), m.group(1)) for m in GROUP.finditer(page)]
    for (start, group), (end, _) in zip(starts, [*starts[1:], (len(page), "")], strict=True):
        result[group] = CARD.findall(page, start, end)
    return result


def test_counts_equal_the_rows_and_the_page_sits_beside_them(gray_run: dict[str, Any]) -> None:
    rows, page = gray_run["rows"], gray_run["page"]
    expected = Counter("error" if row["error"] else row["label"] for row in rows)
    counts = page_counts(page)
    assert {k: v for k, v in counts.items() if v} == dict(expected)
    assert counts["unknown"] == 0 and counts["error"] == 1 and sum(counts.values()) == len(rows) == 25
    assert f'<td id="total">{len(rows)}</td>' in page
    assert gray_run["summary"].report == gray_run["out"].with_name("p.report.html")
    assert "Tumor if argmax is Tumor or p(Tumor) &gt;= " in page  # the decision rule in words
    assert "images/s" in page and "fp32: the file given" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch: opens from disk


def test_flagged_cards_come_first_positive_by_p_then_uncertain(gray_run: dict[str, Any]) -> None:
    rows = {row["path"]: row for row in gray_run["rows"]}
    page = gray_run["page"]
    groups = cards_by_group(page)
    assert list(groups) == ["positive", "uncertain", "unknown"]
    tumor = [path for _, path in groups["positive"]]
    assert tumor and {label for label, _ in groups["positive"]} == {"Tumor"}
    assert len(tumor) == sum(row["label"] == "Tumor" for row in rows.values())
    p = [float(rows[path]["p_Tumor"]) for path in tumor]
    assert p == sorted(p, reverse=True)
    spec = OnnxClassifier(gray_run["model"], threads=1).spec
    uncertain = [path for _, path in groups["uncertain"]]
    assert uncertain and all(triage(rows[path], spec)[0] is Group.UNCERTAIN for path in uncertain)
    ranks = [triage(rows[path], spec)[1] for path in uncertain]
    assert ranks == sorted(ranks, reverse=True)
    assert (
        page.index('data-group="positive"') < page.index('data-group="uncertain"') < page.index('id="others"')
    )
    assert page.count("data:image/jpeg;base64,") == len(tumor) + len(uncertain)  # one thumbnail per card
    carded = set(tumor) | set(uncertain)  # every other readable row is a table row
    table = re.findall(r'<tr data-label="[^"]*" data-path="([^"]*)"><td class="path">', page)
    assert sorted(table) == sorted(path for path in rows if path not in carded)


def test_report_max_cuts_each_group_and_the_rest_go_to_the_table(
    gray_run: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "p.csv"
    page_file = tmp_path / "triage.html"
    predict_folder(
        gray_run["root"] / "images",
        PredictOptions(
            model=gray_run["model"],
            out=out,
            workers=1,
            threads=1,
            report=ReportOptions(page_file, max_per_group=2),
        ),
    )
    page = page_file.read_text(encoding="utf-8")
    groups = cards_by_group(page)
    assert [len(groups["positive"]), len(groups["uncertain"])] == [2, 2]
    assert groups["positive"] == cards_by_group(gray_run["page"])["positive"][:2]  # the two most probable
    assert not report_path(out).exists()


def unknown_and_error_rows(spec: ModelSpec) -> list[dict[str, Any]]:
    def row(path: str, label: str, ood: float | None, error: str | None = None) -> dict[str, Any]:
        p = dict(zip(spec.class_names, (0.7, 0.1, 0.1, 0.1), strict=True))
        return {"path": path, "label": None if error else label, "argmax_label": None if error else "Cyst",
                "confidence": None if error or label == "unknown" else 0.7, "ood_score": ood, "error": error,
                **{f"p_{name}": None if error else value for name, value in p.items()}}  # fmt: skip

    return [row("/x/cat.jpg", "unknown", 9.5), row("/x/chest.jpg", "unknown", 12.25), row("/x/ok.jpg", "Cyst", 1.0),
            row("/x/empty.png", "", None, "not an image Pillow can read (truncated)")]  # fmt: skip


def test_unknowns_and_errors_are_listed_with_their_reasons(tmp_path: Path) -> None:
    spec = ModelSpec(input_size=32)
    rows = unknown_and_error_rows(spec)
    view = np.zeros((128, 128, 3), np.uint8)
    overlays = {
        path: Overlay(view, np.ones((4, 4, 4), np.float32)) for path in ("/x/cat.jpg", "/x/chest.jpg")
    }
    facts = RunFacts("m.onnx", "fp32", "argmax", "energy score > 8 is unknown", processed=4, wall_s=1.0)
    page_file = tmp_path / "page.html"
    written = write_report(page_file, rows, spec, facts, overlays)
    page = page_file.read_text(encoding="utf-8")
    assert written.counts == {"Cyst": 1, "Normal": 0, "Stone": 0, "Tumor": 0, "unknown": 2, "error": 1}
    assert cards_by_group(page)["unknown"] == [
        ("unknown", "/x/chest.jpg"),
        ("unknown", "/x/cat.jpg"),
    ]  # by score
    assert "out-of-distribution score 12.2500 above the detector&#x27;s threshold" in page
    assert "energy score &gt; 8 is unknown" in page
    errors = page[page.index('id="errors"') : page.index('id="others"')]
    assert "Unreadable files (1)" in errors and "/x/empty.png" in errors
    assert "not an image Pillow can read (truncated)" in errors


def write_two_series(study: Path) -> None:
    """Two DICOM series of one study (6 and 3 slices), brighter along z: p(Tumor) rises slice by slice."""
    pytest.importorskip("pydicom")
    from kidney_edge.phantoms.dicom_series import SliceHeader, write_slice

    for series, count in (("1", 6), ("2", 3)):
        for i in range(count):
            header = SliceHeader(
                "P1", "1.2.3", f"1.2.3.{series}", f"1.2.3.{series}.{i + 1}", i + 1, (0.0, 0.0, 5.0 * i)
            )
            write_slice(study / f"s{series}" / header.sop_uid, np.full((16, 16), -150.0 + 60.0 * i), header)


def test_series_runs_get_a_strip_and_a_z_curve_per_series(tmp_path: Path) -> None:
    write_two_series(tmp_path / "study")
    model = make_cam_onnx(tmp_path / "model.onnx")
    summary = predict_folder(
        tmp_path / "study",
        PredictOptions(
            model=model,
            out=tmp_path / "p.csv",
            workers=1,
            threads=1,
            report=ReportOptions(),
            series=SeriesOptions(),
        ),
    )
    assert summary.predicted == 9 and summary.series is not None and summary.series.n_series == 2
    page = report_path(tmp_path / "p.csv").read_text(encoding="utf-8")
    strips = re.findall(r'<article class="series".*?</article>', page, flags=re.S)
    assert len(strips) == 2 and "DICOM series (2)" in page
    for strip, slices in zip(strips, (6, 3), strict=True):  # both start with 3 slices of the same p
        (points,) = re.findall(r'<polyline points="([^"]+)"/>', strip)
        assert len(points.split()) == slices
        ys = [float(point.split(",")[1]) for point in points.split()]
        assert ys == sorted(ys, reverse=True)  # p(Tumor) rises along z: y falls on the SVG
        assert strip.count("<figure") == min(5, slices) and strip.count("data:image/jpeg") == min(5, slices)
        assert f"{slices} slices" in strip and "<title>p(Tumor) along z" in strip


STRIP = re.compile(r'<article class="series".*?</article>', flags=re.S)


def spy_on_assess_series(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every call of series.assess_series, from whichever kidney_edge module calls it: (study, series) UIDs."""
    import sys

    from kidney_edge.runtime import series

    calls: list[tuple[str, str]] = []
    original = series.assess_series

    def spy(slices: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((slices[0][0].study_uid, slices[0][0].series_uid))
        return original(slices, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("kidney_edge") and getattr(module, "assess_series", None) is original:
            monkeypatch.setattr(module, "assess_series", spy)
    return calls


def run_cli_on_two_series(tmp_path: Path, *extra: str) -> tuple[Any, Path]:
    from typer.testing import CliRunner

    from kidney_edge.cli import app

    write_two_series(tmp_path / "study")
    model = make_cam_onnx(tmp_path / "model.onnx")
    out = tmp_path / "predictions.csv"
    args = ["predict", str(tmp_path / "study"), "--model", str(model), "--out", str(out), "--workers", "1"]
    return CliRunner().invoke(app, [*args, "--threads", "1", "--report", *extra]), out


def test_a_report_run_assesses_each_series_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_on_assess_series(monkeypatch)
    result, out = run_cli_on_two_series(tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(calls) == [("1.2.3", "1.2.3.1"), ("1.2.3", "1.2.3.2")]  # once each: rows and page share it
    series_rows = list(csv.DictReader(open(out.with_name("series.csv"), newline="")))
    page = report_path(out).read_text(encoding="utf-8")
    assert [row["series_uid"] for row in series_rows] == ["1.2.3.1", "1.2.3.2"]
    assert len(STRIP.findall(page)) == 2 and "DICOM series (2)" in page
    for row in series_rows:  # the page shows the series rows' own labels
        assert f'series {row["series_uid"]}: <span class="label">{row["label"]}</span>' in page


def test_no_series_means_no_strips_on_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_on_assess_series(monkeypatch)
    result, out = run_cli_on_two_series(tmp_path, "--no-series")
    assert result.exit_code == 0, result.output
    page = report_path(out).read_text(encoding="utf-8")
    assert not calls and not out.with_name("series.csv").exists()
    assert not STRIP.findall(page) and 'id="series"' not in page and "DICOM series" not in page
    assert sum(page_counts(page).values()) == 9  # the slice rows are all there


def test_resume_covers_old_and_new_rows(gray_run: dict[str, Any], tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_gray_images(images, 10)
    out = tmp_path / "p.csv"
    predict_folder(images, PredictOptions(model=gray_run["model"], out=out, workers=1, threads=1))
    old = {row["path"] for row in csv.DictReader(open(out, newline=""))}
    write_gray_images(tmp_path / "images" / "more", 6, seed=5)
    summary = predict_folder(
        images,
        PredictOptions(
            model=gray_run["model"], out=out, workers=1, threads=1, resume=True, report=ReportOptions()
        ),
    )
    assert (summary.skipped, summary.processed) == (10, 6)
    page = report_path(out).read_text(encoding="utf-8")
    assert sum(page_counts(page).values()) == 16
    assert "10 rows were already in the predictions file (--resume)" in page
    carded = {path for group in cards_by_group(page).values() for _, path in group}
    assert carded and not carded & old  # old rows have no thumbnails: they are table rows
    listed = set(re.findall(r'<tr data-label="[^"]*" data-path="([^"]*)">', page)) | carded
    assert old < listed and len(listed) == 16


def test_the_page_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, target = ModelSpec(input_size=32), tmp_path / "page.html"
    facts = RunFacts("m.onnx", "fp32", "argmax", None, processed=4, wall_s=1.0)
    write_report(target, unknown_and_error_rows(spec), spec, facts)
    before = target.read_bytes()

    def crash(*_: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_report(target, unknown_and_error_rows(spec)[:1], spec, facts)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["page.html"]


class _Evidence:
    def __init__(self, inputs: dict[int, np.ndarray], cams: dict[int, np.ndarray]) -> None:
        self.inputs, self.cams = inputs, cams


def collect(suffix: str, batches: int = 40) -> tuple[dict[str, Overlay], list[tuple[float, str]]]:
    """Tumor calls in random order of p, 8 per folder, through a collector keeping 3 per group."""
    collector = TriageCollector(ModelSpec(input_size=32), max_per_group=3)
    rng = np.random.default_rng(0)
    seen: list[tuple[float, str]] = []
    for batch in range(batches):
        p = rng.uniform(0.5, 1.0, size=8)
        rows = [{"path": f"/d{batch}/{i}{suffix}", "label": "Tumor", "confidence": v, "p_Tumor": v, "error": None}
                for i, v in enumerate(p)]  # fmt: skip
        seen += [(row["p_Tumor"], row["path"]) for row in rows]
        inputs = {i: rng.normal(size=(3, 32, 32)).astype(np.float32) for i in range(8)}
        collector.add(rows, _Evidence(inputs, {i: np.ones((4, 4, 4)) for i in range(8)}))
    return collector.overlays(), seen


def test_the_collector_keeps_only_the_top_rows_of_each_group() -> None:
    kept, seen = collect(".dcm")  # 320 DICOM slices in 40 folders
    assert len(kept) <= 3 + 3 * 5  # three cards, three folders of five strip slices: bounded
    ranked = sorted(seen, reverse=True)
    assert {path for _, path in ranked[:3]} <= set(kept)
    folders: list[str] = []
    for _, path in ranked:  # the three folders with the most positive slices
        if os.path.dirname(path) not in folders:
            folders.append(os.path.dirname(path))
    assert {os.path.dirname(path) for path in kept} == set(folders[:3])
    assert all(
        item.view.shape == (32, 32) and item.view.dtype == np.uint8 for item in kept.values()
    )  # gray spec
    jpegs, seen = collect(".jpg")  # raster files are never series: the three cards only
    assert set(jpegs) == {path for _, path in sorted(seen, reverse=True)[:3]}


def test_with_headers_the_collector_keys_strips_by_series_not_folder() -> None:
    from kidney_edge.runtime.series import DicomHeader

    # Under one URL "folder": two series of 6 Tumor slices (p rising), then a row without a header.
    paths = [f"http://pacs/instances/{i}" for i in range(13)]
    headers = {path: DicomHeader(path, "1.2", f"1.2.{i // 6}") for i, path in enumerate(paths[:12])}
    collector = TriageCollector(ModelSpec(input_size=32), max_per_group=2, headers=headers.get)
    rows = [{"path": path, "label": "Tumor", "confidence": 0.5 + i / 30, "p_Tumor": 0.5 + i / 30, "error": None}
            for i, path in enumerate(paths)]  # fmt: skip
    collector.add(rows, _Evidence({i: np.zeros((3, 32, 32), np.float32) for i in range(13)}, {}))
    # Each series keeps its five most positive slices (one folder would keep 7..11 only), and the
    # two top cards; the headerless row is a card, never a strip slice.
    assert set(collector.overlays()) == {paths[i] for i in (1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12)}


def test_report_off_asks_for_no_maps_and_writes_no_page(gray_run: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    asked: list[bool] = []
    infer = OnnxClassifier.infer

    def spy(self: OnnxClassifier, batch: np.ndarray, **kwargs: Any) -> Any:
        asked.append(kwargs.get("cam", False))
        return infer(self, batch, **kwargs)

    monkeypatch.setattr(OnnxClassifier, "infer", spy)
    out = tmp_path / "p.csv"
    predict_folder(
        gray_run["root"] / "images", PredictOptions(model=gray_run["model"], out=out, workers=1, threads=1)
    )
    assert asked and not any(asked) and not report_path(out).exists()
    asked.clear()
    predict_folder(
        gray_run["root"] / "images",
        PredictOptions(model=gray_run["model"], out=out, workers=1, threads=1, report=ReportOptions()),
    )
    assert asked and all(asked)  # the same one call per batch, now with the cam output
    assert LocalEngine.__dataclass_fields__["evidence"].default is False


def test_bad_report_options_name_the_flag(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--report-max must be in 1\.\.1000"):
        ReportOptions(max_per_group=0)
    with pytest.raises(InputError, match="--report-path .*ending in .html"):
        ReportOptions(tmp_path)


def test_cli_report_path_implies_report_and_bad_values_exit_2(
    gray_run: dict[str, Any], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kidney_edge.cli import app

    args = ["predict", str(gray_run["root"] / "images"), "--model", str(gray_run["model"]), "--workers", "1"]
    runner = CliRunner()
    result = runner.invoke(
        app, [*args, "--out", str(tmp_path / "p.csv"), "--report-path", str(tmp_path / "t.html")]
    )
    assert result.exit_code == 3, result.output  # the broken file: some rows failed
    assert "triage page -> " in result.output and (tmp_path / "t.html").is_file()
    assert not report_path(tmp_path / "p.csv").exists()
    for extra, message in (
        (["--report-path", str(tmp_path / "t.txt")], "ending in .html"),
        (["--report", "--report-max", "0"], "--report-max must be in 1..1000"),
    ):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "q.csv"), *extra])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(
    "spec",
    [ModelSpec(input_size=32), ModelSpec(input_size=32, color_mode="rgb", channel_order="BGR",
                                         mean=(10.0, 120.0, 200.0), std=(50.0, 60.0, 70.0))],
    ids=["gray", "rgb-bgr"],
)  # fmt: skip
def test_model_view_undoes_preprocessing(spec: ModelSpec) -> None:
    from kidney_edge.imaging import preprocess, resized_image
    from kidney_edge.runtime.triage import model_view

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    expected = np.asarray(resized_image(pixels, spec))  # what preprocess normalises
    assert np.array_equal(model_view(preprocess(pixels, spec), spec), expected)


def test_a_region_models_cards_draw_the_map_back_onto_the_slice(tmp_path: Path) -> None:
    """A kidney-band model's card shows the whole slice with the map and the band outlined; a file
    that no longer decodes to its row's view keeps the view it was predicted from."""
    import base64
    import io

    from PIL import Image
    from test_regions import axial_slice

    from kidney_edge.imaging import preprocess
    from kidney_edge.runtime.triage import model_view
    from kidney_edge.spec import RegionRule

    spec = ModelSpec(input_size=64, region=RegionRule.KIDNEYS)
    kept, changed = tmp_path / "kept.png", tmp_path / "changed.png"
    for path in (kept, changed):
        axial_slice().save(path)
    cams = np.zeros((4, 8, 8), np.float32)
    cams[3, 4, 4] = 1.0  # Tumor's evidence in the middle of the view: about the vertebra
    overlays = {
        str(path): Overlay(model_view(preprocess(path, spec), spec), cams) for path in (kept, changed)
    }
    Image.new("L", (400, 300), 0).save(changed)  # replaced after its row was predicted
    rows = [{"path": str(path), "label": "Tumor", "argmax_label": "Tumor", "confidence": 0.9, "p_Tumor": 0.9,
             "error": None} for path in (kept, changed)]  # fmt: skip
    facts = RunFacts("m.onnx", "fp32", "argmax", None, processed=2, wall_s=1.0)
    page = write_report(tmp_path / "page.html", rows, spec, facts, overlays).path.read_text(encoding="utf-8")
    pictures = dict(
        re.findall(r'<img src="data:image/jpeg;base64,([^"]+)" width="128" height="128" alt="([^"]+)"', page)
    )
    (slice_picture,) = [data for data, alt in pictures.items() if alt.startswith("kept.png: the slice with")]
    assert "changed.png: the model&#x27;s view with the activation map of Tumor" in pictures.values()
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(slice_picture))).convert("RGB"), dtype=int)
    assert drawn.shape == (128, 128, 3)
    # The 400 x 300 slice letterboxed to 128 px: rows 16..112. In front of the band (the liver at
    # y 55-105 of the slice, thumbnail y 34-50) the slice is gray; the band's edge is amber.
    front = drawn[20:45, 10:118]
    assert np.abs(front[..., 0] - front[..., 2]).max() < 20
    amber = (drawn[..., 0] > 180) & (drawn[..., 1] > 140) & (drawn[..., 2] < 90)
    assert amber[55:60].any()  # the band's top edge, slice y 126 -> thumbnail y 56
    inside = drawn[59:92, 18:109]  # the band (thumbnail x 15-112, y 56-95) inside its outline
    red = inside[..., 0] - inside[..., 2]
    y, x = np.unravel_index(np.argmax(red), red.shape)
    # The evidence's cell maps to slice (217, 206): thumbnail (69, 82).
    assert red.max() > 60 and abs(x + 18 - 69) <= 6 and abs(y + 59 - 82) <= 6
