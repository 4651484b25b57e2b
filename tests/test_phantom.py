"""Phantom generator: layout, labels file, patients, duplicates, determinism, findings."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kidney_edge.errors import InputError
from kidney_edge.phantoms.classic import synthesize
from kidney_edge.phantoms.kaggle_layout import KAGGLE_CLASS_COUNTS, class_counts


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _number(name: str) -> int:
    return int(name.split("(")[1].split(")")[0])


def test_class_counts_follow_the_kaggle_mix() -> None:
    assert class_counts(12446) == KAGGLE_CLASS_COUNTS
    counts = class_counts(100)
    assert sum(counts.values()) == 100
    assert counts == {"Cyst": 30, "Normal": 41, "Stone": 11, "Tumor": 18}
    assert class_counts(10, {"Cyst": 1, "Tumor": 1}) == {"Cyst": 5, "Tumor": 5}


def test_layout_and_labels_file(phantom_dir: Path) -> None:
    labels = _rows(phantom_dir / "kidneyData.csv")
    assert list(labels[0]) == ["image_id", "path", "diag", "target", "Class"]
    assert len(labels) == 120
    target_of = {"Cyst": "0", "Normal": "1", "Stone": "2", "Tumor": "3"}  # sorted order, as on Kaggle
    for row in labels:
        assert row["Class"] == row["diag"] and row["target"] == target_of[row["Class"]]
        assert row["path"] == f"{row['Class']}/{row['image_id']}.jpg"
        assert (phantom_dir / row["path"]).is_file()
    for name, count in class_counts(120).items():
        files = sorted((phantom_dir / name).glob("*.jpg"), key=lambda p: _number(p.name))
        assert [p.name for p in files] == [f"{name}- ({k}).jpg" for k in range(1, count + 1)]
    image = Image.open(phantom_dir / "Cyst" / "Cyst- (1).jpg")
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (128, 128)
    pixels = np.asarray(image, dtype=np.int16)
    assert np.abs(pixels[..., 0] - pixels[..., 1]).max() <= 2  # gray stored as RGB


def test_patients_are_consecutive_and_duplicates_are_byte_copies(phantom_dir: Path) -> None:
    truth = _rows(phantom_dir / "phantom_truth.csv")
    assert {"path", "patient", "slice", "finding", "lesion_x", "lesion_y", "lesion_radius_px"} <= set(
        truth[0]
    )
    originals = [row for row in truth if not row["duplicate_of"]]
    slices = Counter(row["patient"] for row in originals)
    assert len(slices) < len(originals) and max(slices.values()) <= 8  # several slices per patient
    for patient in slices:
        numbers = sorted(_number(r["path"]) for r in originals if r["patient"] == patient)
        assert numbers[-1] - numbers[0] <= len(numbers)  # consecutive, at most one interloper
    copies = [row for row in truth if row["duplicate_of"]]
    assert 1 <= len(copies) <= 0.06 * len(truth)
    for row in copies:
        assert (phantom_dir / row["path"]).read_bytes() == (phantom_dir / row["duplicate_of"]).read_bytes()
    findings = {row["class"]: row["finding"] for row in truth}
    assert findings == {"Normal": "none", "Cyst": "cyst", "Stone": "stone", "Tumor": "tumor"}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    def digest(folder: Path) -> str:
        files = sorted(folder.rglob("*.jpg"))
        return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        synthesize(tmp_path / name, n=12, size=64, seed=seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    assert (tmp_path / "a" / "phantom_truth.csv").read_text() == (
        tmp_path / "b" / "phantom_truth.csv"
    ).read_text()


def _lesion_patch(folder: Path, row: dict[str, str], half: int) -> np.ndarray:
    image = np.asarray(Image.open(folder / row["path"]).convert("L"), dtype=np.float32)
    x, y = int(float(row["lesion_x"])), int(float(row["lesion_y"]))
    return image[max(0, y - half) : y + half + 1, max(0, x - half) : x + half + 1]


def test_findings_look_as_described(tmp_path: Path) -> None:
    """A stone is a very bright dot; a cyst is darker than the kidney around it; difficulty shrinks lesions."""
    mix = {"Cyst": 1, "Stone": 1}
    easy = synthesize(tmp_path / "easy", n=24, size=256, seed=4, class_mix=mix)
    hard = synthesize(tmp_path / "hard", n=24, size=256, seed=4, class_mix=mix, difficulty=3.0)
    truth = _rows(easy.truth_csv)
    stones = [r for r in truth if r["finding"] == "stone"]
    assert np.median([_lesion_patch(easy.out_dir, r, 1).max() for r in stones]) > 200
    cysts = [r for r in truth if r["finding"] == "cyst"]
    assert all(float(r["lesion_contrast_hu"]) < -10 for r in cysts)  # water-dark vs cortex
    radius = {
        name: np.mean([float(r["lesion_radius_px"]) for r in _rows(s.truth_csv) if r["finding"] == "cyst"])
        for name, s in (("easy", easy), ("hard", hard))
    }
    assert radius["hard"] < 0.7 * radius["easy"]


def test_easy_phantoms_have_larger_findings_fewer_plain_studies_and_more_patients(tmp_path: Path) -> None:
    """Difficulty below 1 (the demo's 0.25) makes findings conspicuous; slices_per_patient sets patients."""
    easy = synthesize(tmp_path / "easy", n=60, size=128, seed=2, difficulty=0.25, slices_per_patient=(1, 1))
    default = synthesize(tmp_path / "default", n=60, size=128, seed=2, slices_per_patient=(1, 1))
    assert easy.n_patients == default.n_patients == 60 - easy.n_duplicates  # one slice per patient
    rows = {name: _rows(s.truth_csv) for name, s in (("easy", easy), ("default", default))}

    def mean_radius(name: str, finding: str) -> float:
        return float(np.mean([float(r["lesion_radius_px"]) for r in rows[name] if r["finding"] == finding]))

    for finding in ("cyst", "stone", "tumor"):
        assert mean_radius("easy", finding) > 1.5 * mean_radius("default", finding), finding
    plain = {name: sum(r["phase"] == "non-contrast" for r in rows[name]) / 60 for name in rows}
    assert plain["easy"] < 0.2 < plain["default"]
    runs = synthesize(tmp_path / "runs", n=40, size=64, slices_per_patient=(3, 4))
    slices = Counter(r["patient"] for r in _rows(runs.truth_csv) if not r["duplicate_of"])
    assert max(slices.values()) <= 4
    assert sum(count < 3 for count in slices.values()) <= 4  # only a class's last patient is cut short


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"n": 0}, "--n"),
        ({"slices_per_patient": (3, 2)}, "--slices-per-patient"),
        ({"size": 8}, "--size"),
        ({"difficulty": 10.0}, "--difficulty"),
        ({"class_mix": {"X": 1}}, "class mix"),
    ],
)
def test_bad_options_name_the_flag(tmp_path: Path, options: dict, flag: str) -> None:
    with pytest.raises(InputError, match=flag):
        synthesize(tmp_path, **options)


def test_rerun_replaces_a_previous_phantom_and_refuses_other_folders(tmp_path: Path) -> None:
    synthesize(tmp_path / "p", n=20, size=64)
    synthesize(tmp_path / "p", n=8, size=64)
    assert len(list((tmp_path / "p").rglob("*.jpg"))) == 8
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        synthesize(tmp_path / "mine", n=4, size=64)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
