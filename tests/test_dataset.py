"""Scan, leakage-safe splits, audit and the splits.csv manifest."""

from __future__ import annotations

import csv
import dataclasses
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
    DatasetScan,
    ScannedImage,
    SplitConfig,
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
from kidney_edge.phantoms.classic import synthesize

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
    assert any("inflated" in warning for warning in audit["warnings"])
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
        ({"max_group_share": 0.0}, "--max-group-share"),
        ({"proportion_tolerance": 0.0}, "--proportion-tolerance"),
        ({"min_eval_images": -1}, "--min-eval-images"),
    ],
)
def test_bad_split_options_name_the_flag(scan400, options: dict, flag: str) -> None:
    with pytest.raises(InputError, match=flag):
        make_splits(scan400, **options)


# ----------------------------------------------------------------------------- look-alike chains
#
# Synthetic scans, no image files: each "patient" is a run of consecutively numbered slices
# whose perceptual hashes (or thumbnails) differ a little, and neighbouring patients differ more
# but still within the link thresholds, so single linkage chains a whole class into one group.


# Options that leave plain single linkage: no group is ever cut.
_NO_CUTS = {"max_group_share": None, "proportion_tolerance": 1.0, "min_eval_images": 0}


def _scanned(
    root: Path, label: str, number: int, hash_bits: np.ndarray, thumbnail: bytes = b""
) -> ScannedImage:
    path = root / label / f"{label}- ({number}).jpg"
    return ScannedImage(path, label, f"{label}-{number}", np.packbits(hash_bits).tobytes(), thumbnail)


def _hash_chain(root: Path, label: str, patient_sizes: list[int], rng: np.random.Generator):
    """Items and their patient ids: each patient 12 fresh hash bits from the previous one (linked
    at <= 32 bits, so the class chains), its slices 1 bit apart (the strongest links)."""
    base = rng.integers(0, 2, 256).astype(bool)
    items, patients = [], []
    for p, n_slices in enumerate(patient_sizes):
        base = base ^ np.isin(np.arange(256), rng.choice(256, 12, replace=False))
        slice_bits = rng.choice(256, n_slices, replace=False)
        for s in range(n_slices):
            bits = base ^ np.isin(np.arange(256), slice_bits[:s])
            items.append(_scanned(root, label, len(items) + 1, bits))
            patients.append(f"{label}{p}")
    return items, patients


def _scan_of(root: Path, items: list) -> DatasetScan:
    return DatasetScan(root, tuple(sorted({item.label for item in items})), items, [])


def _group_members(result) -> dict[str, list[int]]:
    members: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(result.rows):
        members[row.group].append(index)
    return members


def test_look_alike_hash_chain_is_cut_between_patients_and_copies_stay_together(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    items, patients = _hash_chain(tmp_path, "Cyst", [4] * 24, rng)
    copied = items[-1]  # eight byte-identical copies of the last slice: one atom of 9 files
    items += [
        dataclasses.replace(copied, path=copied.path.with_name(f"Cyst- ({200 + k}).jpg")) for k in range(8)
    ]
    patients += [patients[-1]] * 8
    scan = _scan_of(tmp_path, items)  # 104 images: the 5% bound is 5

    chained = make_splits(scan, series_distance=None, **_NO_CUTS)
    assert chained.audit["groups"]["total"] == 1  # single linkage alone: one group of all 24 patients

    result = make_splits(scan, series_distance=None)
    audit = result.audit
    assert audit["group_cuts"]["bound_images"] == 5 and audit["group_cuts"]["groups_cut"] == 1
    groups = _group_members(result)
    copies = {i for i, item in enumerate(items) if item.sha256 == copied.sha256}
    assert len(copies) == 9 and any(set(m) == copies for m in groups.values())  # copies never divided
    assert len({result.rows[i].split for i in copies}) == 1
    # Above the bound only the copies, kept whole: even from the other slices of their patient.
    assert sorted(len(m) for m in groups.values())[-2:] == [4, 9] and audit["groups"]["largest"] == 9
    # The weakest links are between patients, so every other patient stays in one group.
    group_of = {i: g for g, m in groups.items() for i in m}
    for patient in set(patients[:-12]):
        assert len({group_of[i] for i, p in enumerate(patients) if p == patient}) == 1, patient
    assert any("byte-identical" in w and "above the 5-image bound" in w for w in audit["warnings"])


def _thumbnail_chain(root: Path, labels: list[str], patient_sizes: list[int], rng: np.random.Generator):
    """One numbered series whose patients alternate between ``labels`` (as a labels file can
    relabel files of one folder): slices of a patient differ by a little noise, neighbouring
    patients by a drift that keeps their thumbnails within the series distance."""
    smooth = rng.normal(0, 1, (4, 4)).repeat(4, axis=0).repeat(4, axis=1).ravel()
    items, patients, number = [], [], 0
    for p, n_slices in enumerate(patient_sizes):
        smooth = smooth + rng.normal(0, 0.08, 256)  # neighbours 0.09-0.12 apart, slices 0.02
        label = labels[p % len(labels)]
        for _ in range(n_slices):
            number += 1
            pixels = np.clip(128 + 40 * (smooth + rng.normal(0, 0.01, 256)), 0, 255).astype(np.uint8)
            item = _scanned(root, label, number, rng.integers(0, 2, 256).astype(bool), pixels.tobytes())
            items.append(dataclasses.replace(item, path=root / "All" / f"All- ({number}).jpg"))
            patients.append(f"P{p}")
    return items, patients


def test_series_links_join_one_label_and_a_series_chain_is_cut_between_patients(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    items, patients = _thumbnail_chain(tmp_path, ["Normal"], [4] * 25, rng)
    scan = _scan_of(tmp_path, items)  # 100 images, one series: the bound is 5
    chained = make_splits(scan, near_dup_distance=None, **_NO_CUTS)
    assert chained.audit["groups"]["total"] == 1 and chained.audit["near_duplicates"]["series_pairs"] > 100
    result = make_splits(scan, near_dup_distance=None)
    groups = _group_members(result)
    assert max(len(m) for m in groups.values()) <= 5
    group_of = {i: g for g, m in groups.items() for i in m}
    for patient in set(patients):
        assert len({group_of[i] for i, p in enumerate(patients) if p == patient}) == 1, patient

    mixed, _ = _thumbnail_chain(tmp_path, ["Cyst", "Tumor"], [4] * 10, rng)
    audit = make_splits(_scan_of(tmp_path, mixed), near_dup_distance=None, **_NO_CUTS).audit
    # Every neighbouring patient carries the other label: no chain, each patient alone.
    assert audit["groups"]["with_mixed_labels"] == 0 and audit["groups"]["total"] == 10


def test_proportions_hold_on_400_look_alike_images_without_splitting_patients(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    items, patients = [], []
    for label, count in {"Normal": 163, "Cyst": 119, "Tumor": 73, "Stone": 45}.items():
        sizes = []
        while sum(sizes) < count:
            sizes.append(int(min(rng.integers(3, 8), count - sum(sizes))))
        class_items, class_patients = _hash_chain(tmp_path, label, sizes, rng)
        items += class_items
        patients += class_patients
    scan = _scan_of(tmp_path, items)
    chained = make_splits(scan, series_distance=None, **_NO_CUTS)
    assert chained.audit["groups"]["largest"] == 163  # a whole class in one group: no stratified split

    result = make_splits(scan, series_distance=None)
    audit = result.audit
    assert audit["groups"]["largest"] <= 20  # 5% of 400
    assert [w for w in audit["warnings"] if "twin in train" not in w] == []  # look-alikes across cut links
    for label in scan.class_names:
        members = [r for r in result.rows if r.label == label]
        for split, target in zip(("train", "val", "test"), (0.7, 0.15, 0.15), strict=True):
            held = sum(r.split == split for r in members)
            assert abs(held / len(members) - target) <= 0.05, (label, split, held)
            assert split == "train" or held >= 5
    splits_of_patient: dict[str, set[str]] = defaultdict(set)
    for patient, row in zip(patients, result.rows, strict=True):
        splits_of_patient[patient].add(row.split)
    assert [p for p, splits in splits_of_patient.items() if len(splits) > 1] == []


def test_groups_that_moves_and_swaps_cannot_balance_are_dealt_exactly(tmp_path: Path) -> None:
    # Six sets of byte-identical copies: single moves and pairwise swaps stop at 41/9/7, short of
    # test's 8.55 - 1.14 images; only moving two groups at once reaches 39/9/9.
    rng = np.random.default_rng(4)
    items = []
    for copies in (17, 15, 9, 7, 5, 4):
        original = _scanned(tmp_path, "Stone", len(items) + 1, rng.integers(0, 2, 256).astype(bool))
        items += [
            dataclasses.replace(original, path=original.path.with_name(f"Stone- ({len(items) + k}).jpg"))
            for k in range(1, copies + 1)
        ]
    counts = make_splits(_scan_of(tmp_path, items), max_group_share=None).audit["counts"]
    assert [counts[s]["Stone"] for s in ("train", "val", "test")] == [39, 9, 9]


def test_val_and_test_short_of_a_small_class_are_warned_about(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    items = []
    for label, count in {"Normal": 60, "Stone": 12}.items():
        for k in range(count):
            items.append(_scanned(tmp_path, label, 10 * k, rng.integers(0, 2, 256).astype(bool)))
    result = make_splits(_scan_of(tmp_path, items))
    counts = result.audit["counts"]
    assert counts["val"]["Normal"] >= 5 and counts["test"]["Normal"] >= 5
    warned = [w for w in result.audit["warnings"] if "--min-eval-images 5" in w]
    assert len(warned) == 2 and all("Stone" in w and "only 12" in w for w in warned)
    assert make_splits(_scan_of(tmp_path, items), min_eval_images=1).audit["warnings"] == []


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
    result = split_dataset(data, out, SplitConfig(seed=1))
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
    # 120 images hold 13 Stones: fewer than 5 in val and test, and the audit's warnings say so.
    assert "warning:" in result.output and "--min-eval-images 5" in result.output
    assert (tmp_path / "splits_audit.json").is_file()
    missing = runner.invoke(app, ["split", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
