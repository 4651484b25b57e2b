"""Atomic writes: the old file or the new one, never half of one; ordinary permissions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kidney_edge.io_utils import atomic_path, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_file_with_default_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_json(target, {"accuracy": 0.5})
    atomic_write_json(target, {"accuracy": 0.75})
    assert json.loads(target.read_text()) == {"accuracy": 0.75}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temp files left


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
