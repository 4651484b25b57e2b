"""The shared test machinery in conftest.py, seen working: under CI a missing optional
dependency is a failure, not a skip, whether the test module or one test asks for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_NEEDS_A_MISSING_EXTRA = """
import pytest

missing = pytest.importorskip("kidney_edge_no_such_extra")


def test_uses_the_extra():
    assert missing
"""
_ONE_TEST_NEEDS_IT = """
import pytest


def test_asks_inside():
    pytest.importorskip("kidney_edge_no_such_extra")


def test_needs_nothing():
    pass
"""


def run_pytest_on_missing_extras(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """pytest in a fresh interpreter on two tiny test files, with this suite's conftest.py (every
    file collected even when one fails to: a CI run stops at the first collection error)."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (tmp_path / "test_module_level.py").write_text(_NEEDS_A_MISSING_EXTRA, encoding="utf-8")
    (tmp_path / "test_function_level.py").write_text(_ONE_TEST_NEEDS_IT, encoding="utf-8")
    env = {name: value for name, value in os.environ.items() if name != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "--continue-on-collection-errors"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("ci", [None, "0"])
def test_without_ci_a_missing_extra_skips(tmp_path: Path, ci: str | None) -> None:
    run = run_pytest_on_missing_extras(tmp_path, ci)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 2 skipped" in run.stdout and "kidney_edge_no_such_extra" in run.stdout


@pytest.mark.parametrize("ci", ["1", "true"])
def test_under_ci_a_missing_extra_fails(tmp_path: Path, ci: str) -> None:
    run = run_pytest_on_missing_extras(tmp_path, ci)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "skipped" not in run.stdout
    assert "1 failed, 1 passed, 1 error" in run.stdout, run.stdout  # the module's error is its collection
    summary = "Failed: CI is set, so a missing optional dependency fails: could not import 'kidney_edge_no_such_extra'"
    assert f"ERROR test_module_level.py - {summary}" in run.stdout
    assert f"FAILED test_function_level.py::test_asks_inside - {summary}" in run.stdout
