"""Look-alike renderer: Kaggle layout, patients, duplicates, varied scans, determinism, findings, CLI."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kidney_edge.errors import InputError
from kidney_edge.phantoms.kaggle_layout import TRUTH_COLUMNS, class_counts
from kidney_edge.phantoms.lookalike import (
    CALCIUM_HU,
    OWN_TRUTH_COLUMNS,
    SIZE_FACTORS,
    render_patient,
    synthesize,
)
from kidney_edge.phantoms.styles import PhantomStyle, synthesizer


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _number(name: str) -> int:
    return int(name.split("(")[1].split(")")[0])


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 look-alike slices at a nominal 128 px."""
    out = tmp_path_factory.mktemp("lookalike") / "data"
    synthesize(out, n=24, size=128, seed=0)
    return out


@pytest.fixture(scope="module")
def larger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 slices at a nominal 48 px: enough patients for duplicates and look-alike calcifications."""
    out = tmp_path_factory.mktemp("lookalike") / "data"
    synthesize(out, n=200, size=48, seed=1)
    return out


def test_kaggle_layout_and_label_files(small: Path) -> None:
    labels = _rows(small / "kidneyData.csv")
    assert list(labels[0]) == ["image_id", "path", "diag", "target", "Class"]
    target_of = {"Cyst": "0", "Normal": "1", "Stone": "2", "Tumor": "3"}  # sorted order, as on Kaggle
    for row in labels:
        assert row["Class"] == row["diag"] and row["target"] == target_of[row["Class"]]
        assert row["path"] == f"{row['Class']}/{row['image_id']}.jpg"
    for name, count in class_counts(24).items():
        files = sorted((small / name).glob("*.jpg"), key=lambda p: _number(p.name))
        assert [p.name for p in files] == [f"{name}- ({k}).jpg" for k in range(1, count + 1)]
    truth = _rows(small / "phantom_truth.csv")
    assert tuple(truth[0]) == (*TRUTH_COLUMNS, *OWN_TRUTH_COLUMNS)
    assert sorted(r["path"] for r in truth) == sorted(r["path"] for r in labels)
    assert {r["class"]: r["finding"] for r in truth} == {
        "Normal": "none", "Cyst": "cyst", "Stone": "stone", "Tumor": "tumor"
    }  # fmt: skip
    image = Image.open(small / "Stone" / "Stone- (1).jpg")
    assert image.format == "JPEG" and image.mode == "RGB"
    pixels = np.asarray(image, dtype=np.int16)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 2  # gray stored as RGB


def test_scans_vary_per_patient(small: Path) -> None:
    truth = _rows(small / "phantom_truth.csv")
    allowed = {int(round(128 * f / 8)) * 8 for f in SIZE_FACTORS}
    sizes = {}
    for row in truth:
        side = Image.open(small / row["path"]).size
        assert side[0] == side[1] == int(row["size_px"]) and side[0] in allowed
        sizes.setdefault(row["patient"], set()).add(side[0])
    assert all(len(s) == 1 for s in sizes.values())  # one scanner setting per patient
    assert len(set().union(*sizes.values())) >= 2
    per_patient = {r["patient"]: (r["jpeg_quality"], r["noise_hu"], r["fov_mm"]) for r in truth}
    assert len(set(per_patient.values())) == len(per_patient)
    assert all(60 <= int(q) <= 95 for q, _, _ in per_patient.values())


def test_one_scanner_images_the_same_patients_alike(small: Path, tmp_path: Path) -> None:
    alike = tmp_path / "alike"
    synthesizer(PhantomStyle.lookalike_one_scanner)(alike, n=24, size=128, seed=0)
    varied, same = _rows(small / "phantom_truth.csv"), _rows(alike / "phantom_truth.csv")
    anatomy = ("path", "class", "patient", "finding", "kidney_side", "phase", "habitus", "confounders")
    assert [[r[c] for c in anatomy] for r in same] == [[r[c] for c in anatomy] for r in varied]
    acquisition = {(r["size_px"], r["kernel"], r["noise_hu"], r["window"][-4:], r["jpeg_quality"]) for r in same}
    assert acquisition == {("128", "standard", "20.0", "/400", "90")}
    levels = [int(r["window"].split("/")[0]) for r in same]  # raised only to keep a bright cortex grey
    assert min(levels) == 50 and levels.count(50) > len(levels) / 2
    assert all(Image.open(alike / r["path"]).size == (128, 128) for r in same)
    assert len({(r["kernel"], r["noise_hu"], r["window"]) for r in varied}) > 1


def test_patients_are_3_to_6_consecutive_slices_and_duplicates_are_byte_copies(larger: Path) -> None:
    truth = _rows(larger / "phantom_truth.csv")
    originals = [r for r in truth if not r["duplicate_of"]]
    slices = Counter(r["patient"] for r in originals)
    assert set(slices.values()) <= {3, 4, 5, 6} and len(set(slices.values())) > 1
    for patient in slices:
        rows = [r for r in originals if r["patient"] == patient]
        assert sorted(int(r["slice"]) for r in rows) == list(range(len(rows)))
        numbers = sorted(_number(r["path"]) for r in rows)
        assert numbers[-1] - numbers[0] <= len(numbers) + 1  # consecutive, copies may sit between
    copies = [r for r in truth if r["duplicate_of"]]
    assert 0.01 * len(truth) <= len(copies) <= 0.05 * len(truth)
    for row in copies:
        assert (larger / row["path"]).read_bytes() == (larger / row["duplicate_of"]).read_bytes()
    habitus = Counter(r["habitus"] for r in originals if r["slice"] == "0")
    assert max(habitus.values()) >= 2  # some patients share a body habitus


def test_look_alike_calcifications_and_hyperdense_cysts_appear(larger: Path) -> None:
    truth = _rows(larger / "phantom_truth.csv")
    calcified = {"aortic-calcium", "gallstones", "bowel-dots"}
    for name in ("Normal", "Cyst", "Tumor"):
        assert any(calcified & set(r["confounders"].split("+")) for r in truth if r["class"] == name), name
    cysts = {r["patient"]: r["hyperdense"] for r in truth if r["class"] == "Cyst"}
    assert set(cysts.values()) == {"0", "1"}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    def digest(folder: Path) -> str:
        files = sorted(folder.rglob("*.jpg"))
        return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()

    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthesize(tmp_path / name, n=12, size=64, seed=seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    assert (tmp_path / "a" / "phantom_truth.csv").read_bytes() == (
        tmp_path / "b" / "phantom_truth.csv"
    ).read_bytes()


def test_a_stone_is_calcium_in_the_collecting_system_and_a_normal_kidney_has_none() -> None:
    for seed in range(3):
        stone = render_patient("Stone", seed=seed, size=128, n_slices=3)
        normal = render_patient("Normal", seed=seed, size=128, n_slices=3)
        for s in stone:
            assert s.finding.any() and s.hu[s.kidneys | s.collecting_system].max() > CALCIUM_HU
            assert s.pixels[s.finding].max() >= 250  # above the window: white
            x, y = (int(round(v)) for v in s.finding_xy)
            assert s.collecting_system[y - 2 : y + 3, x - 2 : x + 3].any()
        for s in normal:
            assert not s.finding.any() and s.kidneys.sum() > 50
            assert s.hu[s.kidneys | s.collecting_system].max() < 300


def test_cysts_and_tumours_differ_from_the_kidney_around_them() -> None:
    for seed in range(3):
        for name in ("Cyst", "Tumor"):
            s = render_patient(name, seed=seed, size=128, n_slices=1)[0]
            rim = s.kidneys & ~s.finding
            assert s.finding.sum() > 10
            assert abs(float(s.hu[s.finding].mean() - s.hu[rim].mean())) > 8, (name, seed)


def test_difficulty_shrinks_findings(tmp_path: Path) -> None:
    def relative_radius(difficulty: float) -> float:
        summary = synthesize(
            tmp_path / str(difficulty),
            n=24,
            size=48,
            seed=3,
            difficulty=difficulty,
            class_mix={"Cyst": 1, "Tumor": 1},
        )
        rows = _rows(summary.truth_csv)
        return float(np.mean([float(r["lesion_radius_px"]) / int(r["size_px"]) for r in rows]))

    assert relative_radius(0.25) > 1.5 * relative_radius(2.0)


@pytest.mark.parametrize(
    ("options", "flag"),
    [({"n": 0}, "--n"), ({"size": 8}, "--size"), ({"difficulty": 10.0}, "--difficulty"),
     ({"slices_per_patient": (4, 3)}, "--slices-per-patient")],
)  # fmt: skip
def test_bad_options_name_the_flag(tmp_path: Path, options: dict, flag: str) -> None:
    with pytest.raises(InputError, match=flag):
        synthesize(tmp_path, **options)


def test_styles_choose_the_renderer() -> None:
    from kidney_edge.phantoms import classic

    assert synthesizer("classic") is classic.synthesize
    assert synthesizer(PhantomStyle.lookalike) is synthesize
    with pytest.raises(InputError, match="--style"):
        synthesizer("photoreal")


def test_cli_synth_lookalike(tmp_path: Path) -> None:
    from kidney_edge.cli import app

    runner = CliRunner()
    out = tmp_path / "look"
    result = runner.invoke(app, ["synth", str(out), "--style", "lookalike", "--n", "24", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert "wrote 24 images" in result.output
    truth = _rows(out / "phantom_truth.csv")
    assert len(truth) == 24 and "habitus" in truth[0]
    assert set(Counter(r["patient"] for r in truth if not r["duplicate_of"]).values()) <= {3, 4, 5, 6}
    result = runner.invoke(app, ["synth", str(tmp_path / "bad"), "--style", "photoreal"])
    assert result.exit_code == 2
