"""Scan, leakage-safe splits, audit and the splits.csv manifest."""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kidney_edge.dataset import (
    audit_path,
    data_fingerprint,
    make_splits,
    near_duplicate_pairs,
    perceptual_hash,
    read_splits,
    scan_dataset,
    split_dataset,
    write_splits,
)
from kidney_edge.errors import InputError
from kidney_edge.phantom import synthesize

KAGGLE_ROOT = (
    "/kaggle/input/ct-kidney-dataset-normal-cyst-tumor-and-stone/CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
)


@pytest.fixture(scope="module")
def phantom400(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom400") / "data"
    synthesize(out, n=400, size=128, seed=5)
    return out


@pytest.fixture(scope="module")
def scan400(phantom400: Path):
    return scan_dataset(phantom400)


def _image(path: Path, seed: int, size: int = 48) -> Path:
    """A small image of random blobs: different seeds give unrelated pictures."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(coarse).resize((size, size), Image.BICUBIC).convert("RGB").save(path)
    return path


def _patients(folder: Path) -> dict[str, str]:
    with open(folder / "phantom_truth.csv", newline="") as handle:
        return {row["path"]: row["patient"] for row in csv.DictReader(handle)}


def _splits_per(rows, key) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        found[key(row)].add(row.split)
    return found


# ----------------------------------------------------------------------------- split on phantom data


def test_grouped_split_is_stratified_and_keeps_every_group_together(phantom400: Path, scan400) -> None:
    result = make_splits(scan400, seed=0)
    rows = result.rows
    assert len(rows) == 400 and len(scan400.problems) == 0
    for label in scan400.class_names:
        members = [r for r in rows if r.label == label]
        for split, target in zip(("train", "val", "test"), (0.7, 0.15, 0.15), strict=True):
            share = sum(r.split == split for r in members) / len(members)
            assert abs(share - target) <= 0.02, (label, split, share)
    assert all(len(s) == 1 for s in _splits_per(rows, lambda r: r.sha256).values())
    assert all(len(s) == 1 for s in _splits_per(rows, lambda r: r.group).values())
    patient = _patients(phantom400)
    crossing = {
        p: s
        for p, s in _splits_per(rows, lambda r: patient[r.path.relative_to(phantom400).as_posix()]).items()
        if len(s) > 1
    }
    assert crossing == {}  # no phantom patient in two splits, found from image content + numbering alone
    audit = result.audit
    assert audit["max_proportion_error"] <= 0.02
    assert audit["exact_duplicates"]["groups"] >= 1 and audit["near_duplicates"]["groups"] >= 1
    assert audit["groups"]["crossing_splits"] == 0 and audit["leaked_images"] == 0
    for numbers in audit["leak"].values():
        assert numbers["exact_twin_in_train"] == 0 and numbers["near_twin_in_train"] == 0


def test_random_mode_reports_the_leak_it_makes(scan400, caplog: pytest.LogCaptureFixture) -> None:
    result = make_splits(scan400, seed=0, mode="random")
    assert "inflated" in caplog.text
    audit = result.audit
    assert audit["mode"] == "random"
    assert audit["groups"]["crossing_splits"] > 10
    assert audit["leaked_images"] > 0.2 * (audit["leak"]["val"]["images"] + audit["leak"]["test"]["images"])
    # Counted independently: val/test images whose exact bytes are in train.
    train = {r.sha256 for r in result.rows if r.split == "train"}
    exact = sum(r.split != "train" and r.sha256 in train for r in result.rows)
    assert exact == sum(v["exact_twin_in_train"] for v in audit["leak"].values())


def test_split_is_deterministic_per_seed(scan400) -> None:
    first, again, other = (make_splits(scan400, seed=s) for s in (3, 3, 4))
    assert [(r.path, r.split, r.group) for r in first.rows] == [
        (r.path, r.split, r.group) for r in again.rows
    ]
    assert [r.split for r in first.rows] != [r.split for r in other.rows]
    assert data_fingerprint(first.rows) == data_fingerprint(again.rows) != data_fingerprint(other.rows)


def test_group_pattern_keeps_matching_files_together(scan400) -> None:
    pattern = r"^(\w+)/"  # whole classes as groups: an extreme case that is easy to check
    result = make_splits(scan400, group_pattern=pattern, near_dup_distance=None, series_distance=None)
    assert all(len(s) == 1 for s in _splits_per(result.rows, lambda r: r.label).values())
    assert result.audit["pattern_groups"] == 4
    decades = make_splits(scan400, group_pattern=r"^(.*\(\d*)\d\)")  # the documented example
    key = re.compile(r"^(.*\(\d*)\d\)")
    blocks = _splits_per(
        decades.rows, lambda r: key.search(r.path.relative_to(scan400.root).as_posix()).group(1)
    )
    assert "Cyst/Cyst- (1" in blocks and all(len(s) == 1 for s in blocks.values())
    with pytest.raises(InputError, match="--group-pattern"):
        make_splits(scan400, group_pattern="([")


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"ratios": (0.5, 0.1)}, "--ratios"),
        ({"mode": "shuffle"}, "--split-mode"),
        ({"near_dup_distance": 999}, "--near-dup"),
    ],
)
def test_bad_split_options_name_the_flag(scan400, options: dict, flag: str) -> None:
    with pytest.raises(InputError, match=flag):
        make_splits(scan400, **options)


# ----------------------------------------------------------------------------- hashing


def test_perceptual_hash_matches_imagehash(phantom400: Path) -> None:
    imagehash = pytest.importorskip("imagehash")
    for path in sorted(phantom400.glob("*/*.jpg"))[:5]:
        image = Image.open(path).convert("L")
        ours = np.unpackbits(np.frombuffer(perceptual_hash(image), np.uint8)).astype(bool)
        theirs = imagehash.phash(image, hash_size=16).hash.ravel()
        assert (ours != theirs).sum() <= 2  # float rounding at the median only


def test_near_duplicate_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 32), dtype=np.uint8)
    base[1] = base[0] ^ np.eye(32, dtype=np.uint8)[3] * 7  # 3 bits away from item 0
    hashes = [row.tobytes() for row in base]
    bits = np.unpackbits(base, axis=1)
    brute = {(i, j) for i in range(40) for j in range(i + 1, 40) if (bits[i] != bits[j]).sum() <= 100}
    found = {tuple(p) for p in near_duplicate_pairs(hashes, 100, chunk=7).tolist()}
    assert found == brute and (0, 1) in found


# ----------------------------------------------------------------------------- Kaggle layout and bad input


def test_kaggle_layout_and_labels_file_read_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
    names = {"Cyst": [12, 13, 1002], "Normal": [1, 2], "Stone": [7], "Tumor": [5, 6]}
    lines = [",image_id,path,diag,target,Class"]
    seed = 0
    for target, (label, numbers) in enumerate(names.items()):
        for number in numbers:
            seed += 1
            _image(root / label / f"{label}- ({number}).jpg", seed)
            lines.append(
                f"{seed},{label}- ({number}),{KAGGLE_ROOT}/{label}/{label}- ({number}).jpg,{label},{target},{label}"
            )
    # The labels file wins over the folder: this Normal file is listed as a Tumor.
    lines[-1] = lines[-1].replace(
        f"{KAGGLE_ROOT}/Tumor/Tumor- (6).jpg", f"{KAGGLE_ROOT}/Normal/Normal- (2).jpg"
    )
    # A path column that leads nowhere still resolves through Class/image_id.jpg.
    lines = [line.replace(f"{KAGGLE_ROOT}/Stone/Stone- (7).jpg", "D:\\old\\place.jpg") for line in lines]
    (root / "kidneyData.csv").write_text("\n".join(lines) + "\n")
    scan = scan_dataset(root)
    assert scan.class_names == ("Cyst", "Normal", "Stone", "Tumor")
    label = {p.path.relative_to(root).as_posix(): p.label for p in scan.items}
    assert label["Cyst/Cyst- (12).jpg"] == "Cyst" and label["Cyst/Cyst- (1002).jpg"] == "Cyst"
    assert label["Normal/Normal- (2).jpg"] == "Tumor" and label["Stone/Stone- (7).jpg"] == "Stone"
    assert [p.path.name for p in scan.problems] == ["Tumor- (6).jpg"]  # not listed in the labels file
    assert "not listed" in scan.problems[0].reason and label["Tumor/Tumor- (6).jpg"] == "Tumor"


def test_bad_files_are_listed_and_good_ones_used(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for k in range(3):
        _image(root / "Cyst" / f"Cyst- ({k + 1}).jpg", k)
        _image(root / "Normal" / f"Normal- ({k + 1}).png", 10 + k)
    good = (root / "Cyst" / "Cyst- (1).jpg").read_bytes()
    (root / "Cyst" / "Cyst- (9).jpg").write_bytes(good[: len(good) // 2])  # truncated
    (root / "Cyst" / "Cyst- (10).jpg").write_bytes(b"")
    (root / "Normal" / "notes.txt").write_text("not an image")
    (root / "Normal" / "fake.jpg").write_text("plain text with an image suffix")
    (root / "Stone").mkdir()  # a class with no images
    _image(root / "stray.jpg", 20)  # outside the class folders
    (root / "Tumor").mkdir()
    (root / "Tumor" / "copy.jpg").write_bytes((root / "Normal" / "Normal- (1).png").read_bytes())
    os.symlink("..", root / "Normal" / "loop")  # a symlink loop
    scan = scan_dataset(root)
    assert sorted(p.path.name for p in scan.items) == [
        "Cyst- (1).jpg",
        "Cyst- (2).jpg",
        "Cyst- (3).jpg",
        "Normal- (2).png",
        "Normal- (3).png",
    ]
    assert scan.class_names == ("Cyst", "Normal")
    reasons = {p.path.name: p.reason for p in scan.problems}
    assert "unreadable" in reasons["Cyst- (9).jpg"] and "empty" in reasons["Cyst- (10).jpg"]
    assert "not an image file" in reasons["notes.txt"] and "unreadable" in reasons["fake.jpg"]
    assert "outside the class folders" in reasons["stray.jpg"]
    assert "no readable images" in reasons["Stone"] and "no readable images" in reasons["Tumor"]
    assert "label conflict" in reasons["copy.jpg"] and "label conflict" in reasons["Normal- (1).png"]
    assert "already scanned" in reasons["loop"] or "already scanned" in reasons["data"]
    audit = make_splits(scan).audit
    assert audit["label_conflicts"]["files"] == 2 and len(audit["scan_problems"]) == len(scan.problems)


def test_missing_empty_and_unusable_folders_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files found"):
        scan_dataset(tmp_path / "empty")
    (tmp_path / "bad" / "Cyst").mkdir(parents=True)
    (tmp_path / "bad" / "Cyst" / "a.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(InputError, match="no usable images.*a.jpg"):
        scan_dataset(tmp_path / "bad")


# ----------------------------------------------------------------------------- manifest


def test_splits_csv_round_trip_with_relative_paths(tmp_path: Path, phantom_dir: Path) -> None:
    data = tmp_path / "project" / "data"
    shutil.copytree(phantom_dir, data)
    out = tmp_path / "project" / "runs" / "splits.csv"
    result = split_dataset(data, out, seed=1)
    text = out.read_text()
    assert text.startswith("path,label,split,group,sha256\n") and str(tmp_path) not in text
    assert "../data/Cyst/Cyst- (1).jpg" in text
    assert read_splits(out) == result.rows
    assert audit_path(out).name == "splits_audit.json" and audit_path(out).is_file()
    # Move data and manifest together: the relative paths still resolve, the fingerprint is unchanged.
    shutil.move(tmp_path / "project", tmp_path / "moved")
    moved = read_splits(tmp_path / "moved" / "runs" / "splits.csv")
    assert data_fingerprint(moved) == data_fingerprint(result.rows)
    (tmp_path / "moved" / "data" / "Cyst" / "Cyst- (1).jpg").unlink()
    with pytest.raises(InputError, match=r"1 listed image\(s\) not found: .*Cyst- \(1\)\.jpg"):
        read_splits(tmp_path / "moved" / "runs" / "splits.csv")
    with pytest.raises(InputError, match="does not exist"):
        read_splits(tmp_path / "none.csv")


def test_write_splits_is_atomic_and_complete(tmp_path: Path, scan400) -> None:
    rows = make_splits(scan400).rows
    write_splits(rows, tmp_path / "s.csv")
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]  # no temp file left behind
    assert len((tmp_path / "s.csv").read_text().splitlines()) == len(rows) + 1


def test_cli_split_prints_the_audit(tmp_path: Path, phantom_dir: Path) -> None:
    from kidney_edge.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["split", str(phantom_dir), "--out", str(tmp_path / "splits.csv"), "--seed", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "leakage audit" in result.output and "train" in result.output
    assert (tmp_path / "splits_audit.json").is_file()
    missing = runner.invoke(app, ["split", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
