"""Shared fixtures: no network, ever; a small phantom dataset made once per session. Under CI, a
missing optional dependency fails the run instead of skipping its tests.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any

import pytest

# Environment variable that marks a CI run (.ci/run exports it; hosted CI services set it too).
CI_VARIABLE = "CI"


def pytest_configure(config: pytest.Config) -> None:
    """Under CI, ``pytest.importorskip`` fails instead of skipping.

    CI installs every extra (``pip install -e .[all]``): a test that skips there for want of a
    module hides a broken install or a renamed dependency, and its file of tests vanishes from
    the run. Locally the extras stay optional and the tests skip.
    """
    if os.environ.get(CI_VARIABLE, "").strip().lower() not in ("", "0", "false", "no"):
        original = pytest.importorskip
        pytest.importorskip = _importorskip_or_fail(original)
        config.add_cleanup(lambda: setattr(pytest, "importorskip", original))


def _importorskip_or_fail(importorskip: Any) -> Any:
    @functools.wraps(importorskip)
    def importorskip_or_fail(modname: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return importorskip(modname, *args, **kwargs)
        except pytest.skip.Exception as skipped:
            reason = skipped.msg
        pytest.fail(f"{CI_VARIABLE} is set, so a missing optional dependency fails: {reason}", pytrace=False)

    return importorskip_or_fail


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails loudly (weights and data ship offline)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"network access attempted in a test: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 phantom slices at 128 px in the Kaggle layout (read-only for tests: copy before changing)."""
    from kidney_edge.phantoms.classic import synthesize

    out = tmp_path_factory.mktemp("phantom") / "data"
    synthesize(out, n=120, size=128, seed=0)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module (``pytestmark = usefixtures(...)``).

    On the shared 2-core machines OpenMP's spinning threads make small convolutions several
    times slower; tiny test models run fastest single-threaded.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
