"""`kidney-edge serve`: a local HTTP service and web page for one exported model (no PyTorch).

Exit codes: 0 stopped normally; 2 bad arguments, a missing model or the ``serve`` extra not
installed; 1 other failures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kidney_edge.cli._app import PANEL_EDGE, app, console, err_console, human_bytes, library_errors
from kidney_edge.runtime.precision import Precision
from kidney_edge.runtime.serve.config import ServeConfig

_D = ServeConfig  # defaults come from the library's config


@app.command(rich_help_panel=PANEL_EDGE)
def serve(
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", metavar="PATH", help="Export folder or one .onnx file; default: the newest export/*/."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; anything but loopback prints a warning.")
    ] = _D.host,
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on.")] = _D.port,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="KIDNEY_EDGE_TOKEN",
            help="Require 'Authorization: Bearer TOKEN' (env KIDNEY_EDGE_TOKEN).",
        ),
    ] = None,
    max_bytes: Annotated[
        int,
        typer.Option(
            "--max-bytes",
            help=f"Largest request body in bytes (default {human_bytes(_D.max_bytes)}); larger ones get 413.",
            show_default=False,
        ),
    ] = _D.max_bytes,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Images in flight before 503 + Retry-After.")
    ] = _D.max_queue,
    max_files: Annotated[int, typer.Option("--max-files", help="Files per batch request.")] = _D.max_files,
    max_batch: Annotated[
        int | None,
        typer.Option(
            "--max-batch",
            help="Images per ONNX call at most; default: predict's for the model (8 up to 224 px, 2 at 448 px).",
        ),
    ] = _D.max_batch,
    max_wait_ms: Annotated[
        float,
        typer.Option("--max-wait-ms", help="Milliseconds a request waits for others to batch with."),
    ] = _D.max_wait_ms,
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="onnxruntime threads per worker; default: usable CPUs // workers."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Model calls side by side (and decode threads); default: one per usable CPU, up to 8.",
        ),
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision", help="Model of an export folder: auto as in predict, or force fp32/int8."
        ),
    ] = _D.precision,
    save_dir: Annotated[
        Path | None,
        typer.Option(
            "--save-dir",
            metavar="DIR",
            help="Keep every upload here under a server-chosen name (default: keep nothing).",
        ),
    ] = None,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request.")] = False,
) -> None:
    """Serve a model over HTTP: POST /v1/predict, /v1/predict/batch, GET /healthz, /metrics, and a web page at /.

    Binds 127.0.0.1 by default. No TLS: put a reverse proxy in front to serve other machines.

    Exit codes: 0 stopped normally (Ctrl-C); 2 bad arguments, a missing model or the serve extra not
    installed; 1 other failures.
    """
    from kidney_edge.runtime.serve import serve as run_server

    with library_errors():
        config = ServeConfig(
            model=model, host=host, port=port, token=token, max_bytes=max_bytes, max_queue=max_queue,
            max_files=max_files, max_batch=max_batch, max_wait_ms=max_wait_ms, threads=threads,
            workers=workers, precision=precision, save_dir=save_dir, access_log=access_log,
        )  # fmt: skip
        if config.warning:
            err_console.print(f"[bold yellow]warning:[/] {config.warning}", highlight=False, soft_wrap=True)
        console.print("kidney-edge serve: loading the model; the web page is at /, the API schema at /docs")
        run_server(config)
