"""The Kaggle-layout writer: planning of patients and copies, files and both CSV files, one owner
of the layout's names, and no renderer reaching into another's private names."""

from __future__ import annotations

import ast
import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kidney_edge.errors import InputError
from kidney_edge.phantoms.kaggle_layout import (
    FINDING_COLUMNS,
    LABEL_COLUMNS,
    LABELS_CSV,
    TRUTH_COLUMNS,
    TRUTH_CSV,
    CopyNumbering,
    DrawnSlice,
    PhantomConfig,
    Planning,
    balanced_runs,
    class_counts,
    plan_class,
    uniform_runs,
    write_phantom,
)

PACKAGE = Path(__file__).resolve().parents[1] / "kidney_edge"
LAYOUT_NAMES = {LABELS_CSV, TRUTH_CSV}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class _TextRenderer:
    """Slices whose bytes name them, so a test can tell which slice each file holds."""

    patient_prefix = "T"
    own_truth_columns = ("note",)
    planning = Planning(uniform_runs, CopyNumbering.IN_RUN)

    def __init__(self, config: PhantomConfig) -> None:
        self.plan_rng = np.random.default_rng(config.seed)

    def draw_slices(self, class_index: int, name: str, patient: int, n_slices: int) -> Iterator[DrawnSlice]:
        for s in range(n_slices):
            truth = dict.fromkeys(FINDING_COLUMNS, "")
            yield DrawnSlice(f"{name} {patient} {s}".encode(), {**truth, "note": f"{patient}/{s}"})


def test_runs_add_up_and_stay_in_bounds() -> None:
    rng = np.random.default_rng(0)
    for total, low, high in ((1, 2, 8), (7, 2, 8), (50, 3, 6), (200, 1, 3)):
        for runs in (uniform_runs, balanced_runs):
            sizes = runs(total, low, high, rng)
            assert sum(sizes) == total and max(sizes) <= high, (runs.__name__, total, sizes)
        assert min(balanced_runs(total, low, high, rng)) >= min(low, total)
        assert all(size >= low for size in uniform_runs(total, low, high, rng)[:-1])  # only the last is cut


@pytest.mark.parametrize("numbering", list(CopyNumbering))
def test_plan_files_every_number_once_with_copies(numbering: CopyNumbering) -> None:
    config = PhantomConfig(n=100, duplicate_fraction=0.1, slices_per_patient=(3, 5))
    plan = plan_class("Cyst", 100, config, Planning(uniform_runs, numbering), np.random.default_rng(1))
    numbers = sorted(k for ks in plan.numbers.values() for k in ks)
    assert numbers == list(range(1, 101))
    assert sum(plan.slices_per_patient) == len(plan.numbers) == 90  # 10 copies of 90 slices
    if numbering is CopyNumbering.LOWEST:
        assert all(ks == sorted(ks) for ks in plan.numbers.values())
    else:  # originals of a patient are consecutive but for copies filed in between
        for p, n_slices in enumerate(plan.slices_per_patient):
            firsts = [plan.numbers[(p, s)][0] for s in range(n_slices)]
            assert firsts == sorted(firsts) and firsts[-1] - firsts[0] < n_slices + 10


def test_both_numberings_plan_the_same_files() -> None:
    """The numbering only chooses which file of a slice is the original."""
    config = PhantomConfig(n=60, duplicate_fraction=0.2)
    plans = [
        plan_class("Stone", 60, config, Planning(balanced_runs, numbering), np.random.default_rng(3))
        for numbering in CopyNumbering
    ]
    assert plans[0].slices_per_patient == plans[1].slices_per_patient
    assert {k: sorted(v) for k, v in plans[0].numbers.items()} == {
        k: sorted(v) for k, v in plans[1].numbers.items()
    }
    assert plans[0].numbers != plans[1].numbers  # some copy was filed before its original


def test_writer_files_every_slice_and_both_csv_files(tmp_path: Path) -> None:
    config = PhantomConfig(n=40, seed=2, duplicate_fraction=0.1, class_mix={"Cyst": 1, "Tumor": 1})
    seen: list[tuple[int, int]] = []
    summary = write_phantom(tmp_path, config, _TextRenderer, lambda done, total: seen.append((done, total)))
    assert seen == [(k, 40) for k in range(1, 41)]
    labels, truth = _rows(tmp_path / LABELS_CSV), _rows(tmp_path / TRUTH_CSV)
    assert tuple(labels[0]) == LABEL_COLUMNS and tuple(truth[0]) == (*TRUTH_COLUMNS, "note")
    assert [r["path"] for r in labels] == [r["path"] for r in truth] and len(truth) == summary.n_images == 40
    assert {r["target"] for r in labels if r["Class"] == "Tumor"} == {"3"}  # index in sorted class order
    copies = [r for r in truth if r["duplicate_of"]]
    assert len(copies) == summary.n_duplicates == 4  # 2 per class
    for row in truth:
        name, patient, s = (tmp_path / row["path"]).read_text().split()
        assert (row["class"], row["note"], row["slice"]) == (name, f"{patient}/{s}", s)
        if row["duplicate_of"]:
            assert (tmp_path / row["duplicate_of"]).read_bytes() == (tmp_path / row["path"]).read_bytes()
    assert len({r["patient"] for r in truth}) == summary.n_patients and truth[0]["patient"] == "T00001"
    assert set(class_counts(40, config.class_mix)) == {"Cyst", "Tumor"} == set(summary.class_counts)


def test_writer_refuses_a_renderer_that_leaves_a_column_out(tmp_path: Path) -> None:
    class Forgetful(_TextRenderer):
        own_truth_columns = ("note", "extra")

    with pytest.raises(AssertionError):
        write_phantom(tmp_path, PhantomConfig(n=4), Forgetful)


def test_writer_replaces_its_own_phantom_only(tmp_path: Path) -> None:
    write_phantom(tmp_path / "p", PhantomConfig(n=30), _TextRenderer)
    write_phantom(tmp_path / "p", PhantomConfig(n=6), _TextRenderer)
    assert len(list((tmp_path / "p").rglob("*.jpg"))) == 6
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        write_phantom(tmp_path / "mine", PhantomConfig(n=4), _TextRenderer)


# ----------------------------------------------------------------------------- ownership rules


def layout_name_copies(package: Path) -> list[str]:
    """Places outside kaggle_layout that type a layout file name as a string of their own."""
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).as_posix() == "phantoms/kaggle_layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in LAYOUT_NAMES:
                found.append(f"{path.relative_to(package)}:{node.lineno} {node.value}")
    return found


def private_phantom_uses(package: Path) -> list[str]:
    """Imports of a phantoms module's private names, and ``module._name`` uses of them."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kidney_edge.phantoms"):
                names = [alias.name for alias in node.names]
                found += [
                    f"{path.relative_to(package)}:{node.lineno} {n}" for n in names if n.startswith("_")
                ]
                modules.update(alias.asname or alias.name for alias in node.names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in modules and node.attr.startswith("_"):
                    found.append(f"{path.relative_to(package)}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_layout_names_have_one_owner() -> None:
    assert layout_name_copies(PACKAGE) == []


def test_renderers_use_only_public_names_of_each_other() -> None:
    assert private_phantom_uses(PACKAGE) == []


def test_the_ownership_rules_catch_a_planted_copy(tmp_path: Path) -> None:
    copy = tmp_path / "kidney_edge"
    shutil.copytree(PACKAGE / "phantoms", copy / "phantoms")
    (copy / "evaluation.py").write_text('TRUTH = "phantom_truth.csv"\n')
    (copy / "phantoms" / "dicom_series.py").write_text(
        "from kidney_edge.phantoms import classic\n"
        "from kidney_edge.phantoms.kaggle_layout import _Tables\n\n"
        "lesion = classic._make_lesion\n"
    )
    assert layout_name_copies(copy) == ["evaluation.py:1 phantom_truth.csv"]
    assert private_phantom_uses(copy) == [
        "phantoms/dicom_series.py:2 _Tables",
        "phantoms/dicom_series.py:4 classic._make_lesion",
    ]
