"""Series-level results: aggregation, the series rule, ordering along z and every bad-series case.

Unit tests feed :func:`series_rows` hand-made headers and prediction rows; the bad-series cases
are real DICOM files predicted by the ``predict`` command with a tiny ONNX model.
"""

from __future__ import annotations

import csv
import json
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from _factories import make_tiny_onnx  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from kidney_edge.cli import app  # noqa: E402
from kidney_edge.errors import InputError  # noqa: E402
from kidney_edge.phantoms.dicom_series import AXIAL, CORONAL, SliceHeader, slice_dataset  # noqa: E402
from kidney_edge.runtime.predict import scan_images  # noqa: E402
from kidney_edge.runtime.series import (  # noqa: E402
    AGGREGATIONS,
    UNKNOWN_LABEL,
    Aggregation,
    DicomHeader,
    SeriesRule,
    aggregate,
    register_aggregation,
    series_path,
    series_rows,
)
from kidney_edge.spec import DEFAULT_CLASS_NAMES, DecisionRule, ModelSpec  # noqa: E402

CLASSES = DEFAULT_CLASS_NAMES  # Cyst, Normal, Stone, Tumor
runner = CliRunner()


# --------------------------------------------------------------------------- aggregation


SLICES = np.array(
    [  # (S=4, C=4): Cyst, Normal, Stone, Tumor
        [0.0, 1.0, 0.0, 0.0],
        [0.1, 0.5, 0.0, 0.4],
        [0.0, 0.2, 0.0, 0.8],
        [0.1, 0.7, 0.0, 0.2],
    ]
)


@pytest.mark.parametrize(
    ("how", "top_k", "tumor"),
    [
        ("max", 1, 0.8),
        ("mean", 1, (0.0 + 0.4 + 0.8 + 0.2) / 4),
        ("topk", 2, (0.8 + 0.4) / 2),
        ("topk", 99, (0.0 + 0.4 + 0.8 + 0.2) / 4),  # k beyond the slices: every slice
        ("noisy-or", 1, 1 - (1.0 * 0.6 * 0.2 * 0.8)),
    ],
)
def test_aggregations_match_hand_computed_tumor_scores(how: str, top_k: int, tumor: float) -> None:
    scores = aggregate(SLICES, how, top_k)
    assert scores.shape == (4,) and scores[3] == pytest.approx(tumor)


def test_registry_refuses_duplicates_and_unknown_names() -> None:
    assert set(AGGREGATIONS) == set(Aggregation)
    with pytest.raises(ValueError, match="already registered"):
        register_aggregation(Aggregation.MAX)(lambda p, k: p.max(axis=0))
    with pytest.raises(InputError, match="--aggregate must be one of max, mean, topk, noisy-or"):
        aggregate(SLICES, "median")
    with pytest.raises(InputError, match="--top-k"):
        SeriesRule(top_k=0)


def test_series_scores_normal_is_one_minus_the_strongest_finding() -> None:
    rule = SeriesRule(aggregate="max")
    scores = rule.scores(SLICES, CLASSES)
    np.testing.assert_allclose(scores, [0.1, 1 - 0.8, 0.0, 0.8])
    assert CLASSES[rule.decide(scores[None], CLASSES)[0]] == "Tumor"
    quiet = np.array([[0.2, 0.7, 0.0, 0.1], [0.1, 0.6, 0.0, 0.3]])
    assert CLASSES[rule.decide(rule.scores(quiet, CLASSES)[None], CLASSES)[0]] == "Normal"
    lower = replace(rule, decision=DecisionRule("threshold", positive_class="Tumor", threshold=0.25))
    assert CLASSES[lower.decide(lower.scores(quiet, CLASSES)[None], CLASSES)[0]] == "Tumor"


def test_series_rule_round_trips_through_json(tmp_path: Path) -> None:
    rule = SeriesRule(
        "noisy-or", 5, DecisionRule("threshold", positive_class="Tumor", threshold=0.3, note="val")
    )
    path = tmp_path / "rule.json"
    path.write_text(json.dumps(rule.to_dict()))
    assert SeriesRule.from_file(path) == rule
    assert rule.describe().startswith("noisy-or of slice probabilities; Tumor if")
    assert SeriesRule().aggregate_label == "topk(k=3)"


def test_series_file_sits_beside_the_predictions() -> None:
    assert series_path("out/predictions.csv") == Path("out/series.csv")
    assert series_path("out/predictions.jsonl") == Path("out/series.jsonl")
    assert series_path("out/run1.csv") == Path("out/run1.series.csv")


# --------------------------------------------------------------------------- rows from headers


def _header(name: str, z: float | None, instance: int | None, **changes: object) -> DicomHeader:
    header = DicomHeader(path=f"/s/{name}", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid=f"1.2.3.4.{name}",
                         patient_id="P1", modality="CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                         position=None if z is None else (0.0, 0.0, z), orientation=AXIAL,
                         pixel_spacing=(0.7, 0.7), instance=instance)  # fmt: skip
    return replace(header, **changes)


def _prediction(path: str, tumor: float, label: str | None = None, error: str | None = None) -> dict:
    probs = {"Cyst": 0.0, "Normal": 1.0 - tumor, "Stone": 0.0, "Tumor": tumor}
    called = label or max(probs, key=probs.get)
    return {"path": path, "label": called, "error": error, **{f"p_{k}": v for k, v in probs.items()}}


def _one_row(
    headers: list[DicomHeader], tumors: list[float], rule: SeriesRule | None = None, **rows: dict
) -> dict:
    predictions = [
        rows.get(h.path.rsplit("/", 1)[1]) or _prediction(h.path, t)
        for h, t in zip(headers, tumors, strict=True)
    ]
    (row,) = series_rows(predictions, {h.path: h for h in headers}, CLASSES, rule or SeriesRule(), "Tumor")
    return row


def test_slices_are_ordered_along_the_normal_not_by_file_name() -> None:
    # Files listed a..e; positions put d lowest and b highest. Instance numbers count from the top.
    z = {"a": 10.0, "b": 20.0, "c": 5.0, "d": 0.0, "e": 15.0}
    headers = [_header(name, z[name], int(5 - z[name] / 5)) for name in "abcde"]
    row = _one_row(headers, [0.1, 0.9, 0.2, 0.0, 0.3])
    assert row["peak_slice"] == 4 and row["peak_path"] == "/s/b" and row["peak_instance"] == 1
    assert row["peak_p"] == pytest.approx(0.9) and row["warning"] is None and row["error"] is None
    assert (row["n_files"], row["n_slices"], row["n_Tumor"], row["n_Normal"]) == (5, 5, 1, 4)
    # Reversed orientation (normal along -z): the order along the normal flips.
    flipped = [replace(h, orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)) for h in headers]
    assert _one_row(flipped, [0.1, 0.9, 0.2, 0.0, 0.3])["peak_slice"] == 0


def test_topk_keeps_a_finding_of_three_slices_and_drops_one_stray_slice() -> None:
    headers = [_header(str(i), 5.0 * i, 10 - i) for i in range(10)]
    finding = [0.0] * 6 + [0.9, 0.95, 0.8, 0.0]
    stray = [0.0] * 4 + [0.7] + [0.0] * 5
    assert _one_row(headers, finding)["label"] == "Tumor"
    assert _one_row(headers, stray)["label"] == "Normal"
    assert _one_row(headers, stray, SeriesRule("max"))["label"] == "Tumor"


def test_missing_positions_fall_back_to_instance_number_with_a_warning() -> None:
    headers = [_header("a", None, 3), _header("b", None, 1), _header("c", None, 2)]
    row = _one_row(headers, [0.9, 0.1, 0.2], SeriesRule("max"))
    assert "missing on 3 slice(s): ordered by InstanceNumber" in row["warning"]
    assert row["peak_slice"] == 2 and row["peak_instance"] == 3 and row["label"] == "Tumor"
    bare = [replace(h, instance=None) for h in headers]
    assert "ordered by file name" in _one_row(bare, [0.9, 0.1, 0.2])["warning"]


def test_a_gap_and_a_repeated_position_are_warned_about() -> None:
    gap = [_header(str(i), z, i) for i, z in enumerate([0.0, 5.0, 10.0, 20.0, 25.0])]
    assert (
        "1 gap(s) along z: 10.0 mm between slices 2 and 3 (typical step 5.0 mm)"
        in _one_row(gap, [0.0] * 5)["warning"]
    )
    twice = [_header(str(i), z, i) for i, z in enumerate([0.0, 5.0, 5.0, 10.0])]
    assert "1 slice(s) share a position" in _one_row(twice, [0.0] * 4)["warning"]


def test_unknown_slices_are_counted_and_left_out_of_the_aggregation() -> None:
    headers = [_header(str(i), 5.0 * i, i) for i in range(4)]
    rows = {"0": _prediction("/s/0", 0.99, label=UNKNOWN_LABEL)}
    row = _one_row(headers, [0.99, 0.0, 0.0, 0.1], **rows)
    assert (row["n_unknown"], row["n_slices"], row["label"]) == (1, 3, "Normal")
    assert f"rejected as {UNKNOWN_LABEL}" in row["warning"]


def test_series_counts_slices_under_the_predict_summary_rule() -> None:
    """A series' n_<Class>, n_unknown and n_failed are what predict's summary counts for its slices."""
    from kidney_edge.runtime import PredictSummary
    from kidney_edge.runtime.rows import label_counts

    headers = [_header(str(i), 5.0 * i, i) for i in range(6)]
    special = {"/s/0": _prediction("/s/0", 0.99, label=UNKNOWN_LABEL),
               "/s/1": _prediction("/s/1", 0.9, error="empty file")}  # fmt: skip
    predictions = [
        special.get(h.path) or _prediction(h.path, t)
        for h, t in zip(headers, [0, 0, 0.9, 0.8, 0.1, 0], strict=True)
    ]
    (row,) = series_rows(predictions, {h.path: h for h in headers}, CLASSES, SeriesRule(), "Tumor")
    summary = PredictSummary(out=Path("p.csv"), model=Path("m.onnx"), fmt="csv", decision_rule="argmax",
                             class_names=CLASSES, is_int8=False, ood_detector="msp", threads=1, workers=1,
                             batch_size=2, class_counts=label_counts(CLASSES, ood=True))  # fmt: skip
    summary.record(predictions)
    counts = summary.class_counts
    assert (row["n_failed"], row["n_unknown"]) == (summary.failed, counts[UNKNOWN_LABEL]) == (1, 1)
    assert {name: row[f"n_{name}"] for name in CLASSES} == {name: counts[name] for name in CLASSES}
    assert row["n_slices"] == summary.predicted - counts[UNKNOWN_LABEL] == 4


def test_files_without_series_uids_get_one_error_row() -> None:
    good = [_header(str(i), 5.0 * i, i) for i in range(3)]
    lost = [
        _header("x", 0.0, 1, series_uid=""),
        DicomHeader(path="/s/y", error="unreadable DICOM header (oops)"),
    ]
    headers = {h.path: h for h in (*good, *lost)}
    predictions = [_prediction(path, 0.0) for path in headers]
    rows = series_rows(predictions, headers, CLASSES, SeriesRule(), "Tumor")
    assert len(rows) == 2 and rows[0]["error"] is None
    assert rows[1]["n_files"] == 2 and "2 DICOM file(s) belong to no series" in rows[1]["error"]
    assert "unreadable DICOM header" in rows[1]["error"] and "no StudyInstanceUID" in rows[1]["error"]


# --------------------------------------------------------------------------- bad series on disk


def _write(path: Path, header: SliceHeader, *, value: float = 40.0, edit=None) -> Path:
    ds = slice_dataset(np.full((16, 16), value), header)
    if edit is not None:
        edit(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _compress(ds) -> None:  # noqa: ANN001 - a pydicom Dataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8not-really-jpeg-ls\xff\xd9"])
    ds["PixelData"].VR = "OB"


def _series(root: Path, name: str, count: int, study: str = "1.9.1", **changes: object) -> list[SliceHeader]:
    """``count`` slice headers of one series 1.9.<name>, 5 mm apart, files under root/<name>/."""
    uid = f"1.9.{zlib.crc32(name.encode())}"
    return [
        replace(SliceHeader(patient_id="P9", study_uid=study, series_uid=uid, sop_uid=f"{uid}.{i + 1}",
                            instance=i + 1, position=(0.0, 0.0, -5.0 * i), pixel_spacing=(0.7, 0.7)), **changes)
        for i in range(count)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def bad_studies(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("studies")
    data = root / "pacs"
    cases: dict[str, str] = {}

    def add(case: str, headers: list[SliceHeader], **per_index) -> None:  # noqa: ANN003
        cases[case] = headers[0].series_uid
        for i, header in enumerate(headers):
            _write(data / case / f"{header.sop_uid}", header, **per_index.get(str(i), {}))

    add("good", _series(root, "good", 4))
    add("mr_beside_ct", _series(root, "mr", 3, modality="MR"))
    mixed = _series(root, "mixed", 4)
    add("mixed_modality", [*mixed[:3], replace(mixed[3], modality="MR")])
    scout = _series(root, "scout", 4)
    add("localizer", [replace(scout[0], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), *scout[1:]])
    turned = _series(root, "turned", 5)
    add("orientation", [*turned[:3], *(replace(h, orientation=CORONAL) for h in turned[3:])])
    spaced = _series(root, "spaced", 4)
    add("pixel_spacing", [*spaced[:3], replace(spaced[3], pixel_spacing=(0.9, 0.9))])
    add("no_position", _series(root, "noposition", 3), **{str(i): {"edit": _drop_position} for i in range(3)})
    add("one_slice", _series(root, "single", 1))
    add("compressed", _series(root, "jpegls", 3), **{"1": {"edit": _compress}})
    add("all_compressed", _series(root, "alljpegls", 2), **{str(i): {"edit": _compress} for i in range(2)})
    twice = _series(root, "twice", 3)
    add("duplicate_sop", twice)
    _write(data / "duplicate_sop" / "resent", twice[1])
    _write(
        data / "orphan" / "nouid",
        _series(root, "orphan", 1)[0],
        edit=lambda ds: delattr(ds, "SeriesInstanceUID"),
    )
    model = make_tiny_onnx(root / "model.onnx", ModelSpec(input_size=32))
    result = runner.invoke(
        app, ["predict", str(data), "--model", str(model), "--out", str(root / "out" / "predictions.csv")]
    )
    with open(root / "out" / "series.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {"result": result, "rows": {row["series_uid"]: row for row in rows}, "cases": cases, "root": root,
            "data": data, "model": model, "all_rows": rows}  # fmt: skip


def _drop_position(ds) -> None:  # noqa: ANN001 - a pydicom Dataset
    del ds.ImagePositionPatient, ds.ImageOrientationPatient


def _case(bad_studies: dict, case: str) -> dict:
    return bad_studies["rows"][bad_studies["cases"][case]]


def test_predict_writes_one_series_row_per_series_and_reports_them(bad_studies: dict) -> None:
    result = bad_studies["result"]
    assert result.exit_code == 3, result.output  # the compressed slices have error rows
    assert "series ->" in result.output and "series.csv" in result.output
    assert len(bad_studies["all_rows"]) == len(bad_studies["cases"]) + 1  # + the orphan row
    good = _case(bad_studies, "good")
    assert good["error"] == "" and good["warning"] == "" and good["label"] in CLASSES
    assert (good["n_files"], good["n_slices"], good["patient_id"], good["study_uid"]) == (
        "4",
        "4",
        "P9",
        "1.9.1",
    )
    assert good["aggregate"] == "topk(k=3)" and good["peak_class"] == "Tumor"
    scores = [float(good[f"p_{name}"]) for name in CLASSES]
    assert 0 <= min(scores) and max(scores) <= 1


def test_an_mr_series_beside_the_ct_gets_an_error_row(bad_studies: dict) -> None:
    mr = _case(bad_studies, "mr_beside_ct")
    assert mr["label"] == "" and "modality MR: the model reads CT slices" in mr["error"]
    assert _case(bad_studies, "good")["error"] == ""  # the CT series of the same study is unaffected
    mixed = _case(bad_studies, "mixed_modality")
    assert mixed["label"] == "" and "mixed modalities in one series (CT 3, MR 1)" in mixed["error"]


def test_a_localizer_inside_the_series_is_left_out_with_a_warning(bad_studies: dict) -> None:
    row = _case(bad_studies, "localizer")
    assert "1 localizer/scout image(s) (ImageType LOCALIZER) left out" in row["warning"]
    assert (row["n_files"], row["n_slices"], row["n_left_out"], row["error"]) == ("4", "3", "1", "")


def test_slices_of_another_orientation_are_left_out_with_a_warning(bad_studies: dict) -> None:
    row = _case(bad_studies, "orientation")
    assert (
        "slices in 2 orientations (axial 3, coronal 2): the 3 axial slices aggregated, 2 left out"
        in row["warning"]
    )
    assert (row["n_slices"], row["n_left_out"]) == ("3", "2")


def test_another_pixel_spacing_is_warned_about(bad_studies: dict) -> None:
    row = _case(bad_studies, "pixel_spacing")
    assert "pixel spacing differs within the series (0.70x0.70 mm on 3, 0.90x0.90 mm on 1)" in row["warning"]
    assert row["n_slices"] == "4" and row["label"] in CLASSES


def test_missing_position_tags_order_by_instance_number(bad_studies: dict) -> None:
    row = _case(bad_studies, "no_position")
    assert (
        "ImagePositionPatient/ImageOrientationPatient missing on 3 slice(s): ordered by InstanceNumber"
        in row["warning"]
    )
    assert row["label"] in CLASSES


def test_a_series_of_one_slice_is_labelled_with_a_warning(bad_studies: dict) -> None:
    row = _case(bad_studies, "one_slice")
    assert "a series of one slice" in row["warning"] and row["n_slices"] == "1" and row["label"] in CLASSES


def test_undecodable_slices_are_named_and_a_fully_undecodable_series_is_an_error(bad_studies: dict) -> None:
    row = _case(bad_studies, "compressed")
    assert "1 slice(s) could not be read" in row["warning"] and "JPEG-LS" in row["warning"]
    assert "decoder" in row["warning"]
    assert (row["n_failed"], row["n_slices"], row["label"] in CLASSES) == ("1", "2", True)
    broken = _case(bad_studies, "all_compressed")
    assert broken["label"] == "" and broken["error"].startswith("no slice could be classified")
    assert "2 slice(s) could not be read" in broken["warning"] and broken["n_failed"] == "2"


def test_a_file_sent_twice_is_used_once_with_a_warning(bad_studies: dict) -> None:
    row = _case(bad_studies, "duplicate_sop")
    assert "1 file(s) repeat a SOPInstanceUID of this series (e.g. resent)" in row["warning"]
    assert (row["n_files"], row["n_slices"], row["n_left_out"]) == ("4", "3", "1")


def test_a_file_without_series_uid_is_an_error_row_not_a_merge(bad_studies: dict) -> None:
    (orphan,) = [row for row in bad_studies["all_rows"] if row["series_uid"] == ""]
    assert "1 DICOM file(s) belong to no series" in orphan["error"] and orphan["n_files"] == "1"


def test_series_mode_no_series_mixed_inputs_and_resume(bad_studies: dict, tmp_path: Path) -> None:
    data, model = bad_studies["data"], str(bad_studies["model"])
    off = runner.invoke(app, ["predict", str(data), "--model", model, "--out", str(tmp_path / "a" / "predictions.csv"),
                              "--no-series"])  # fmt: skip
    assert off.exit_code == 3 and not (tmp_path / "a" / "series.csv").exists()
    from PIL import Image

    Image.new("L", (16, 16), 90).save(data.parent / "png.png")
    mixed = data.parent
    auto = runner.invoke(
        app, ["predict", str(mixed), "--model", model, "--out", str(tmp_path / "b" / "run.csv")]
    )
    assert (
        auto.exit_code == 3 and not (tmp_path / "b" / "run.series.csv").exists()
    )  # not every input is DICOM
    forced = runner.invoke(app, ["predict", str(mixed), "--model", model, "--out", str(tmp_path / "b" / "run.jsonl"),
                                 "--format", "jsonl", "--series", "--aggregate", "max"])  # fmt: skip
    lines = (tmp_path / "b" / "run.series.jsonl").read_text().splitlines()
    assert forced.exit_code == 3 and "1 inputs are not DICOM" in forced.output
    assert len(lines) == len(bad_studies["all_rows"]) and json.loads(lines[0])["aggregate"] == "max"
    resumed = runner.invoke(app, ["predict", str(data), "--model", model, "--out", str(tmp_path / "a" / "predictions.csv"),
                                  "--resume"])  # fmt: skip
    assert resumed.exit_code == 0, resumed.output  # nothing left to read; series rows from the whole file
    with open(tmp_path / "a" / "series.csv", newline="", encoding="utf-8") as handle:
        again = {row["series_uid"]: row for row in csv.DictReader(handle)}
    assert again == bad_studies["rows"]
    bad_k = runner.invoke(app, ["predict", str(data), "--model", model, "--top-k", "0"])
    assert bad_k.exit_code == 2 and "--top-k must be in 1..10000" in bad_k.output


def test_uid_named_dicom_files_are_found_by_the_scan(bad_studies: dict) -> None:
    names = {path.name for path in scan_images(bad_studies["data"])}
    good = bad_studies["cases"]["good"]
    assert {f"{good}.{i}" for i in range(1, 5)} <= names  # "1.9.123.4": a numeric 'suffix', not a format
