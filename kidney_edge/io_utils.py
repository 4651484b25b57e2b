"""Atomic file writes (an interrupted run leaves the old file or the new one, never half of one)
and the one CSV writer every table file goes through."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file lives in the same folder so that the final ``os.replace`` is atomic.
    On error it is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def csv_text(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    header: bool = True,
    float_digits: int | None = None,
) -> str:
    """CSV lines (``\\n``-terminated) of ``rows`` in ``columns`` order.

    Keys outside ``columns`` are left out, a missing key or None is an empty cell, and floats
    get ``float_digits`` decimals when given (Python's shortest repr otherwise).
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        if float_digits is not None:
            row = {key: f"{value:.{float_digits}f}" if isinstance(value, float) else value
                   for key, value in row.items()}  # fmt: skip
        writer.writerow(row)
    return buffer.getvalue()


def atomic_write_csv(
    path: str | os.PathLike[str],
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    float_digits: int | None = None,
) -> None:
    """A header line and one line per row (see :func:`csv_text`), written atomically."""
    atomic_write_text(path, csv_text(rows, columns, float_digits=float_digits))


def _json_default(value: Any) -> Any:
    # numpy scalars/arrays and Paths appear in metrics and configs; store them as plain JSON.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
