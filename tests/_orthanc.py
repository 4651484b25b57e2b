"""A real DICOMweb server for the tests and benchmarks/bench_pacs.py: Debian's Orthanc with its DICOMweb plugin.

:func:`running_orthanc` starts ``Orthanc CONFIG.json`` on free loopback ports with its storage in
a temporary folder (never the system service's), waits until ``/system`` answers and stops it
after; ``users`` turns HTTP Basic authentication on. :func:`upload` sends DICOM files with STOW-RS.
:class:`FaultProxy` sits between a client and the server and breaks what a test asks for: a
retrieve cut mid-stream, a rejected store, a slow answer.

Stdlib only (http.client, http.server), so importing it costs nothing.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ORTHANC = "Orthanc"  # Debian package `orthanc`
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian package `orthanc-dicomweb`
DICOMWEB_ROOT = "/dicom-web"
START_TIMEOUT_S = 30.0
_RETRIEVE = re.compile(r"/studies/[^/]+/series/[^/]+(/instances/[^/]+)?$")  # WADO-RS, not QIDO or metadata


def missing() -> str | None:
    """Why Orthanc cannot run here (None when it can)."""
    if shutil.which(ORTHANC) is None:
        return "Orthanc is not installed: apt-get install orthanc orthanc-dicomweb"
    if not PLUGIN.is_file():
        return f"the DICOMweb plugin {PLUGIN} is missing: apt-get install orthanc-dicomweb"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Orthanc:
    http_url: str  # http://127.0.0.1:PORT
    storage: Path
    users: dict[str, str]

    @property
    def dicomweb(self) -> str:
        return self.http_url + DICOMWEB_ROOT

    @property
    def source(self) -> str:
        """predict's spelling of the server."""
        return "dicomweb+" + self.dicomweb

    def get_json(self, path: str) -> object:
        request = urllib.request.Request(self.http_url + path)
        if self.users:
            user, password = next(iter(self.users.items()))
            request.add_header(
                "Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


@contextlib.contextmanager
def running_orthanc(folder: Path, *, users: dict[str, str] | None = None) -> Iterator[Orthanc]:
    """Orthanc with the DICOMweb plugin on free loopback ports, storage under ``folder``."""
    storage = folder / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "kidney-edge-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": port, "DicomPort": free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
        "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT + "/"},
        "StableAge": 1, "HttpTimeout": 30,
    }  # fmt: skip
    (folder / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(f"http://127.0.0.1:{port}", storage, dict(users or {}))
    try:
        _wait_for(server, process, folder)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_for(server: Orthanc, process: subprocess.Popen, folder: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited ({process.returncode}): {(folder / 'orthanc.log').read_text()[-2000:]}"
            )
        try:
            server.get_json("/system")
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not answer /system in {START_TIMEOUT_S:.0f} s")


def upload(server: Orthanc, files: Sequence[Path | str]) -> None:
    """STOW-RS the DICOM ``files`` (several requests of at most 64 files)."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(server.dicomweb)
    if server.users:
        user, password = next(iter(server.users.items()))
        client._session.auth = (user, password)  # the fixture's own upload, not the code under test
    for start in range(0, len(files), 64):
        client.store_instances([pydicom.dcmread(path) for path in files[start : start + 64]])


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client killed mid-request (the kill -9 test) resets its connection: not the proxy's fault."""


class FaultProxy:
    """An HTTP proxy to ``target`` on a free loopback port that breaks what it is told to.

    ``truncate``: a WADO-RS retrieve (of a series or an instance) sends its headers and half its
    body, then closes.
    ``reject_store``: a STOW-RS POST gets 409 Conflict without reaching the server.
    ``delay_s``: each request waits this long first.
    """

    def __init__(self, target: str, *, truncate: bool = False, reject_store: bool = False,
                 delay_s: float = 0.0) -> None:  # fmt: skip
        self.target = target.removeprefix("http://")
        self.truncate, self.reject_store, self.delay_s = truncate, reject_store, delay_s
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

            def do_POST(self) -> None:
                proxy._forward(self)

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def source(self) -> str:
        return "dicomweb+" + self.url + DICOMWEB_ROOT

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        self.requests.append((handler.command, handler.path))
        time.sleep(self.delay_s)
        body = b""
        if handler.command == "POST":
            chunked = "chunked" in handler.headers.get("Transfer-Encoding", "")
            body = (
                _read_chunked(handler)
                if chunked
                else handler.rfile.read(int(handler.headers["Content-Length"]))
            )
        if handler.command == "POST" and self.reject_store:
            handler.send_response(409, "Conflict")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        upstream = http.client.HTTPConnection(self.target, timeout=30)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "transfer-encoding")}
        headers["Content-Length"] = str(len(body))
        upstream.request(handler.command, handler.path, body=body or None, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        upstream.close()
        cut = self.truncate and _RETRIEVE.search(handler.path.partition("?")[0]) is not None
        handler.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.send_header("Connection", "close" if cut else "keep-alive")
        handler.end_headers()
        handler.wfile.write(payload[: len(payload) // 2] if cut else payload)
        handler.wfile.flush()
        if cut:
            handler.close_connection = True


def _read_chunked(handler: BaseHTTPRequestHandler) -> bytes:
    chunks = []
    while True:
        size = int(handler.rfile.readline().strip().split(b";")[0], 16)
        if size == 0:
            handler.rfile.readline()
            return b"".join(chunks)
        chunks.append(handler.rfile.read(size))
        handler.rfile.readline()
