"""Options of ``kidney-edge serve``, validated once so the CLI and library callers get the same messages."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from kidney_edge.errors import InputError, enum_choice
from kidney_edge.runtime.precision import Precision
from kidney_edge.runtime.predict import ExecutionLayout, execution_layout

# Localhost only unless the operator names another address: the service has no user accounts.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MB = 1 << 20


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, token: str | None) -> str | None:
    """The warning a bind address outside this machine needs, or None."""
    if is_loopback(host):
        return None
    if token:
        return (
            f"serving on {host}: reachable from other machines; requests need the bearer token, "
            "and traffic is plain HTTP (put a TLS reverse proxy in front)"
        )
    return (
        f"serving on {host} with NO authentication: anyone who can reach this address can use the "
        "model. Set --token to require a bearer token, and put a TLS reverse proxy in front"
    )


@dataclass(frozen=True)
class ServeConfig:
    """Options of ``kidney-edge serve``.

    ``model``: an .onnx file or an export folder (``precision`` picks fp32 or INT8 in a folder,
    as for ``predict``); None: the newest ``export/*/``. Batching: requests wait at most
    ``max_wait_ms`` for others, and at most ``max_batch`` images run as one ONNX call (None:
    predict's default batch for the model's input,
    :func:`~kidney_edge.runtime.driver.default_batch_size`); up to ``workers`` calls run side by
    side with ``threads`` onnxruntime threads each (None: predict's
    :func:`~kidney_edge.runtime.predict.execution_layout`).
    """

    model: Path | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None
    max_bytes: int = 32 * MB
    max_queue: int = 64
    max_files: int = 32
    max_batch: int | None = None
    max_wait_ms: float = 5.0
    threads: int | None = None
    workers: int | None = None
    precision: Precision = Precision.AUTO
    save_dir: Path | None = None
    access_log: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.model is not None:
            set_(self, "model", Path(self.model))
        if self.save_dir is not None:
            set_(self, "save_dir", Path(self.save_dir))
        set_(self, "precision", enum_choice(Precision, self.precision, "--precision"))
        if self.token is not None and not self.token.strip():
            raise InputError("--token is empty; pass a secret string, or leave --token out")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be in 0..65535, got {self.port}")
        bounds = {
            "--max-bytes": (self.max_bytes, 1, 1 << 31),
            "--max-queue": (self.max_queue, 1, 100_000),
            "--max-files": (self.max_files, 1, 10_000),
            "--max-batch": (self.max_batch, 1, 512),
        }
        for flag, (value, low, high) in bounds.items():
            if value is not None and not low <= value <= high:
                raise InputError(f"{flag} must be in {low}..{high}, got {value}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise InputError(f"--max-wait-ms must be in 0..1000, got {self.max_wait_ms}")
        execution_layout(self.threads, self.workers)  # checks --threads and --workers
        if self.save_dir is not None and self.save_dir.exists() and not self.save_dir.is_dir():
            raise InputError(f"--save-dir {self.save_dir} is a file; pass a folder")

    @property
    def layout(self) -> ExecutionLayout:
        """Model calls side by side and onnxruntime threads each; as many decode threads."""
        return execution_layout(self.threads, self.workers)

    @property
    def warning(self) -> str | None:
        return exposure_warning(self.host, self.token)
