"""``splits.csv``, the manifest of a split: one row per image (path, label, split, group,
sha256), the path of its audit beside it, and the data fingerprint the spec records.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kidney_edge.errors import InputError
from kidney_edge.io_utils import atomic_write_csv
from kidney_edge.layout import AUDIT_SUFFIX

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitRow:
    """One row of splits.csv: an image, its class, its split and its group."""

    path: Path  # absolute
    label: str
    split: str  # "train" | "val" | "test"
    group: str
    sha256: str


_COLUMNS = ("path", "label", "split", "group", "sha256")


def write_splits(rows: Sequence[SplitRow], csv_path: str | Path) -> None:
    """Write the manifest atomically; paths relative to the CSV's folder when possible."""
    csv_path = Path(csv_path)
    base = csv_path.resolve().parent

    def location(path: Path) -> str:
        try:
            return Path(os.path.relpath(path, base)).as_posix()
        except ValueError:  # another drive on Windows
            return path.as_posix()

    records = [
        {
            "path": location(row.path),
            "label": row.label,
            "split": row.split,
            "group": row.group,
            "sha256": row.sha256,
        }
        for row in rows
    ]
    atomic_write_csv(csv_path, records, _COLUMNS)


def read_splits(csv_path: str | Path) -> list[SplitRow]:
    """Read a splits.csv (relative paths resolve against its folder); InputError names missing files."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(
            f"splits file {csv_path} does not exist; make one with `kidney-edge split DATA --out {csv_path}`"
        )
    try:
        records = list(csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read splits file {csv_path}: {exc}") from None
    missing_columns = {"path", "label", "split"} - set(records[0] if records else {})
    if not records or missing_columns:
        raise InputError(f"{csv_path} is not a splits.csv: needs columns path,label,split,group (and rows)")
    base = csv_path.resolve().parent
    rows, missing = [], []
    for number, record in enumerate(records, start=2):
        if record["split"] not in SPLITS:
            raise InputError(
                f"{csv_path} line {number}: split must be one of {SPLITS}, got {record['split']!r}"
            )
        path = (base / record["path"]).resolve()
        if not path.is_file():
            missing.append(str(path))
        rows.append(
            SplitRow(
                path, record["label"], record["split"], record.get("group") or "", record.get("sha256") or ""
            )
        )
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"{csv_path}: {len(missing)} listed image(s) not found: {shown}")
    return rows


def audit_path(csv_path: str | Path) -> Path:
    """Where the audit of a splits.csv lives: ``splits.csv`` -> ``splits_audit.json``."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + AUDIT_SUFFIX)


def data_fingerprint(rows: Sequence[SplitRow]) -> str:
    """sha256 over the sorted (content hash, label, split) triples: independent of where files live."""
    digest = hashlib.sha256()
    for sha, label, split in sorted((row.sha256, row.label, row.split) for row in rows):
        digest.update(f"{sha},{label},{split}\n".encode())
    return digest.hexdigest()
