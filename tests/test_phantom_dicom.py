"""The DICOM series phantom: real CT files, consistent UIDs and geometry, a truthful truth file."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from kidney_edge.errors import InputError  # noqa: E402
from kidney_edge.phantoms.dicom_series import (  # noqa: E402
    AXIAL,
    CORONAL,
    CT_IMAGE_STORAGE,
    SPLITS_CSV,
    SeriesPhantomConfig,
    display_matched_hu,
    instance_ranges,
    parse_instance_ranges,
    read_series_truth,
    synthesize_series,
)
from kidney_edge.phantoms.kaggle_layout import FINDINGS, NORMAL  # noqa: E402
from kidney_edge.spec import CTWindow  # noqa: E402

SMALL = SeriesPhantomConfig(n_series=8, seed=5, size=64, slices_per_series=(5, 7))


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("series")
    synthesize_series(out, SMALL)
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_every_file_is_a_ct_slice_pydicom_reads_with_consistent_uids(series_dir: Path) -> None:
    slices, truth = _rows(series_dir / SPLITS_CSV), read_series_truth(series_dir)
    files = sorted(p for p in series_dir.rglob("*") if p.is_file() and p.suffix not in (".csv",))
    assert len(files) == len(slices) and len(truth) == SMALL.n_series
    by_series: dict[str, list] = defaultdict(list)
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.Modality == "CT"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        patient, study, series = path.relative_to(series_dir).parts[:3]  # PACS layout, no suffix
        assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (patient, study, series)
        assert len(ds.SOPInstanceUID) <= 64 and len(ds.FrameOfReferenceUID) <= 64
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert ds.pixel_array.shape == (SMALL.size, SMALL.size) and -1024 <= hu.min() < hu.max() <= 3071
        assert float(ds.PixelSpacing[0]) == pytest.approx(SMALL.pixel_spacing_mm)
        assert float(ds.SliceThickness) == SMALL.slice_thickness_mm
        by_series[series].append(ds)
    assert len({t["study_uid"] for t in truth}) == SMALL.n_series  # one study per patient
    for datasets in by_series.values():
        names = {d.SOPInstanceUID for d in datasets}
        assert len(names) >= len(datasets) - 1  # the duplicate quirk repeats one SOP UID once


def test_positions_step_one_thickness_down_as_instance_numbers_rise(series_dir: Path) -> None:
    truth = {t["series_uid"]: t for t in read_series_truth(series_dir)}
    by_series: dict[str, list] = defaultdict(list)
    for row in _rows(series_dir / SPLITS_CSV):
        ds = pydicom.dcmread(series_dir / row["path"], stop_before_pixels=True)
        by_series[row["group"]].append(ds)
    quirks = set()
    for uid, datasets in by_series.items():
        axial = sorted({int(d.InstanceNumber): d for d in datasets
                        if tuple(map(float, d.ImageOrientationPatient)) == AXIAL}.items())  # fmt: skip
        z = np.array([float(d.ImagePositionPatient[2]) for _, d in axial])
        steps = -np.diff(z) / SMALL.slice_thickness_mm  # InstanceNumber 1 is the top slice
        numbers = np.diff([number for number, _ in axial])
        np.testing.assert_allclose(steps, numbers)  # a missing slice is a missing number too
        quirk = truth[uid]["quirk"]
        quirks.add(quirk)
        assert (numbers > 1).any() == (quirk == "gap")
        coronal = [d for d in datasets if tuple(map(float, d.ImageOrientationPatient)) == CORONAL]
        assert len(coronal) == (2 if quirk == "mixed_orientation" else 0)
        assert len(datasets) - len({d.SOPInstanceUID for d in datasets}) == (quirk == "duplicate")
    assert quirks == {"", "gap", "duplicate", "mixed_orientation"}


def test_truth_names_each_finding_and_exactly_the_slices_that_show_it(series_dir: Path) -> None:
    labels: dict[str, dict[int, str]] = defaultdict(dict)
    for row in _rows(series_dir / SPLITS_CSV):
        labels[row["group"]][int(row["instance"])] = row["label"]
    for truth in read_series_truth(series_dir):
        shown = parse_instance_ranges(truth["finding_instances"])
        per_slice = labels[truth["series_uid"]]
        assert {n for n, label in per_slice.items() if label != NORMAL} == set(shown)
        assert all(per_slice[n] == truth["label"] for n in shown)
        if truth["label"] == NORMAL:
            assert truth["finding"] == "none" and shown == []
        else:
            assert truth["finding"] == FINDINGS[truth["label"]] and shown  # at least one slice cuts it
        assert truth["split"] in ("val", "test")


def test_display_matched_hu_show_what_the_phantom_window_shows() -> None:
    hu = np.array([-1000.0, -235.0, 40.0, 315.0, 900.0])
    shown, window = (40.0, 550.0), CTWindow(40.0, 400.0)
    mapped = display_matched_hu(hu, shown, window)

    def gray(values: np.ndarray, level: float, width: float) -> np.ndarray:
        return np.clip((values - (level - width / 2)) / width, 0, 1) * 255

    np.testing.assert_allclose(gray(mapped, 40.0, 400.0), gray(hu, *shown), atol=1e-9)
    assert mapped[2] == pytest.approx(40.0)  # the level stays where it was


def test_display_matched_slices_are_the_physical_ones_under_the_phantom_window(tmp_path: Path) -> None:
    hu = {}
    for scale in ("display", "physical"):
        config = SeriesPhantomConfig(n_series=1, seed=1, size=64, slices_per_series=(3, 3),
                                     class_mix={"Normal": 1.0}, quirks=False, hu_scale=scale)  # fmt: skip
        synthesize_series(tmp_path / scale, config)
        first = _rows(tmp_path / scale / SPLITS_CSV)[0]["path"]
        ds = pydicom.dcmread(tmp_path / scale / first)
        hu[scale] = (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).ravel()
    slope, intercept = np.polyfit(hu["physical"], hu["display"], 1)
    residual = hu["display"] - (slope * hu["physical"] + intercept)
    assert np.abs(residual).max() <= 1.0  # one affine map per slice, up to integer rounding
    # The reader's 400 HU window over the easy phantom's 450-650 HU windows.
    width = 400.0 / slope
    assert 320 / 0.25**0.25 - 1 <= width <= 460 / 0.25**0.25 + 1


def test_same_seed_same_bytes_and_a_rerun_replaces_the_previous_series(tmp_path: Path) -> None:
    config = SeriesPhantomConfig(n_series=2, seed=3, size=32, slices_per_series=(3, 4), quirks=False)

    def digest(folder: Path) -> str:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return hashlib.sha256(
            b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files)
        ).hexdigest()

    synthesize_series(tmp_path / "a", config)
    synthesize_series(tmp_path / "b", config)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    synthesize_series(
        tmp_path / "a", SeriesPhantomConfig(n_series=1, seed=4, size=32, slices_per_series=(3, 3))
    )
    assert len(read_series_truth(tmp_path / "a")) == 1
    left = [p for p in (tmp_path / "a").rglob("*") if p.is_file() and p.suffix != ".csv"]
    assert len(left) == len(_rows(tmp_path / "a" / SPLITS_CSV))  # nothing of the old series is left


def test_refuses_a_foreign_folder_and_bad_options(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("not a phantom")
    with pytest.raises(InputError, match="not empty"):
        synthesize_series(tmp_path, SeriesPhantomConfig(n_series=1, size=32))
    with pytest.raises(InputError, match="--slices-per-patient"):
        SeriesPhantomConfig(slices_per_series=(2, 1))
    with pytest.raises(InputError, match="--difficulty"):
        SeriesPhantomConfig(difficulty=9.0)
    with pytest.raises(InputError, match="--format dicom"):
        read_series_truth(tmp_path)  # a folder without series_truth.csv


def test_instance_ranges_round_trip() -> None:
    assert instance_ranges([9, 3, 4, 5, 11, 12]) == "3-5;9;11-12"
    assert parse_instance_ranges("3-5;9;11-12") == [3, 4, 5, 9, 11, 12]
    assert instance_ranges([]) == "" and parse_instance_ranges("") == []


def test_synth_cli_writes_dicom_series(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kidney_edge.cli import app

    result = CliRunner().invoke(app, ["synth", str(tmp_path / "d"), "--format", "dicom", "--n", "3",
                                      "--size", "32", "--slices-per-patient", "3", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 3 DICOM series" in result.output
    assert len(read_series_truth(tmp_path / "d")) == 3
    refused = CliRunner().invoke(
        app, ["synth", str(tmp_path / "e"), "--format", "dicom", "--style", "lookalike"]
    )
    assert refused.exit_code == 2 and "classic" in refused.output
