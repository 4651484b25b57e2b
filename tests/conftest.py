"""Shared fixtures: no network, ever; a small phantom dataset made once per session."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


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
