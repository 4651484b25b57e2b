"""The HTTP face of :class:`~kidney_edge.runtime.serve.service.InferenceService` (FastAPI + uvicorn).

Endpoints: ``POST /v1/predict`` (one image: raw body or a multipart file part),
``POST /v1/predict/batch`` (several file parts), ``GET /v1/model`` (the model card),
``GET /healthz``, ``GET /metrics`` (Prometheus text) and ``GET /``, one self-contained page
(no CDN: edge boxes are offline). Every error is JSON ``{"detail": "<sentence>"}`` with its
status (:class:`~kidney_edge.runtime.serve.schema.ErrorOut`): the service's refusals, the
framework's own (request validation, 404, 405) and an unexpected failure, a 500 with the
exception's type only (its traceback goes to the log). /openapi.json documents each route's
request body and error statuses (:mod:`~kidney_edge.runtime.serve.schema`).
FastAPI and uvicorn (the ``serve`` extra) are imported inside the functions that need them.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations
# (Request, the cam query) at definition time, and they are local names of create_app.

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Annotated, Any

from kidney_edge.errors import ImageReadError, InputError, KidneyEdgeError
from kidney_edge.runtime.serve.config import ServeConfig
from kidney_edge.runtime.serve.limits import (
    DrainUnreadBody,
    Message,
    Receive,
    RequestError,
    Scope,
    Send,
    Unauthorized,
    http_status,
    parse_uploads,
    read_body,
    validation_detail,
)
from kidney_edge.runtime.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kidney_edge.runtime.serve.service import InferenceService

log = logging.getLogger(__name__)

PAGE_FILE = "index.html"  # package data: kidney_edge/runtime/serve/static/
ENDPOINTS = ("/", "/healthz", "/metrics", "/v1/model", "/v1/predict", "/v1/predict/batch")
# The page is static and holds no model data, so a browser can load it before it has a token;
# every other request, the page's own API calls included, needs the bearer token when one is set.
PUBLIC_PATHS = frozenset({"/"})
_OUTCOMES = {200: "ok", 401: "unauthorized", 413: "too_large", 415: "unsupported_type",
             422: "bad_input", 503: "busy"}  # fmt: skip


def _missing_extra() -> InputError:
    return InputError("`kidney-edge serve` needs its extra: pip install 'kidney-edge[serve]'")


def page_html() -> str:
    """The web page, shipped as package data."""
    return (resources.files("kidney_edge.runtime.serve") / "static" / PAGE_FILE).read_text(encoding="utf-8")


def outcome(status: int) -> str:
    """A status code as the ``outcome`` label of the request counter."""
    if status in _OUTCOMES:
        return _OUTCOMES[status]
    return "error" if status >= 500 else "bad_request"


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class GuardMiddleware:
    """Pure ASGI: counts and times every request by endpoint and outcome, and, with a token,
    refuses (401) requests without ``Authorization: Bearer <token>`` outside PUBLIC_PATHS."""

    def __init__(
        self, app: Callable[..., Awaitable[None]], service: InferenceService, token: str | None
    ) -> None:
        self.app, self.service = app, service
        self.expected = None if token is None else f"Bearer {token}".encode()

    def _authorised(self, scope: Scope) -> bool:
        if self.expected is None or scope["path"] in PUBLIC_PATHS:
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self._authorised(scope):
                await self.app(scope, receive, send_and_note)
            else:
                refusal = Unauthorized("missing or wrong bearer token: send 'Authorization: Bearer <token>'")
                await _send_json(
                    send_and_note, refusal.status, {"detail": str(refusal)}, dict(refusal.headers)
                )
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.service.metrics.observe_request(endpoint, outcome(status), time.perf_counter() - started)


def _document_bearer(app: Any) -> None:
    """With --token, /openapi.json says every operation needs ``Authorization: Bearer <token>``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()  # cached by FastAPI as app.openapi_schema
            document.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "the server's --token"}
            }
            document["security"] = [{"bearer": []}]
        return app.openapi_schema

    app.openapi = openapi


def create_app(config: ServeConfig, service: InferenceService | None = None) -> Any:  # -> fastapi.FastAPI
    """The FastAPI app serving ``config``'s model (loaded now, so a bad model fails before binding)."""
    try:
        from fastapi import FastAPI, Query, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        raise _missing_extra() from None
    from kidney_edge import __version__
    from kidney_edge.runtime.serve import schema

    service = service or InferenceService(config)
    page = page_html()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="kidney-edge",
        version=__version__,
        description="Kidney CT slice classifier (Normal, Cyst, Stone, Tumor) on onnxruntime. "
        "Not a medical device: not for diagnosis.",
        lifespan=lifespan,
    )
    app.state.service = service
    upload_errors = schema.error_responses(schema.UPLOAD_ERRORS)
    read_errors = schema.error_responses(schema.READ_ERRORS)

    @app.exception_handler(KidneyEdgeError)
    async def library_error(_request: Request, exc: KidneyEdgeError) -> JSONResponse:
        headers = dict(exc.headers) if isinstance(exc, RequestError) else None
        return JSONResponse({"detail": str(exc)}, status_code=http_status(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def framework_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected %s while serving a request", type(exc).__name__, exc_info=exc)
        detail = f"internal error ({type(exc).__name__}); the server log has the details"
        return JSONResponse({"detail": detail}, status_code=500)

    async def uploads_of(request: Request, *, raw_body: bool) -> list[Any]:
        body = await read_body(request.headers, request.stream(), config.max_bytes)
        return parse_uploads(
            request.headers.get("content-type"), body, max_files=config.max_files, raw_body=raw_body
        )

    CamQuery = Annotated[
        bool, Query(description="add the model's view and its class activation map (PNG data URLs)")
    ]

    @app.post("/v1/predict", response_model=None, openapi_extra=schema.predict_body(config.max_bytes),
              responses={200: {"model": schema.PredictionOut, "description": "the answer"},
                         **upload_errors})  # fmt: skip
    async def predict(request: Request, cam: CamQuery = False) -> JSONResponse:
        """Classify one image: the raw body (Content-Type image/png, image/jpeg, ..., application/dicom)
        or one file part of a multipart form."""
        with service.admit(1):
            uploads = await uploads_of(request, raw_body=True)
            if len(uploads) > 1:
                raise RequestError(
                    f"{len(uploads)} files sent to /v1/predict; send several to /v1/predict/batch"
                )
            return JSONResponse(await service.classify(uploads[0], cam=cam))

    @app.post("/v1/predict/batch", response_model=None,
              openapi_extra=schema.batch_body(config.max_bytes, config.max_files),
              responses={200: {"model": schema.BatchOut, "description": "one entry per file part"},
                         **upload_errors})  # fmt: skip
    async def predict_batch(request: Request, cam: CamQuery = False) -> JSONResponse:
        """Classify several images (multipart file parts). An unreadable file gets its own
        ``{filename, status, detail}`` entry; the others are still answered."""
        with service.admit(1):
            uploads = await uploads_of(request, raw_body=False)
            with service.admit(len(uploads) - 1):
                answers = await asyncio.gather(
                    *(service.classify(upload, cam=cam) for upload in uploads), return_exceptions=True
                )
        results = []
        for upload, answer in zip(uploads, answers, strict=True):
            if isinstance(answer, ImageReadError):
                results.append({"filename": upload.filename, "status": 422, "detail": answer.reason})
            elif isinstance(answer, BaseException):
                raise answer
            else:
                results.append(answer)
        return JSONResponse({"results": results})

    @app.get("/v1/model", response_model=None, responses={200: {"model": schema.ModelCardOut}, **read_errors})
    async def model_card() -> dict[str, Any]:
        """Classes, input size, decision rule, OOD detector, recorded figures, intended use."""
        return service.model_card()

    @app.get("/healthz", response_model=None, responses={
        200: {"model": schema.HealthOut, "description": "ready"},
        503: {"model": schema.HealthOut, "description": "starting: the batcher is not running yet"},
        **read_errors})  # fmt: skip
    async def healthz() -> JSONResponse:
        """Readiness: 200 once the model is loaded and the batcher runs."""
        body = {"status": "ready" if service.ready else "starting", "in_flight": service.in_flight,
                "model": service.identity}  # fmt: skip
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition format"},
        **schema.error_responses(schema.READ_ERRORS, by_reference=True)})  # fmt: skip
    async def metrics() -> PlainTextResponse:
        """Prometheus text format: requests by outcome, latency histograms, batch sizes, model id."""
        return PlainTextResponse(service.metrics.render(service.in_flight), media_type=METRICS_CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    if config.token is not None:
        _document_bearer(app)
    app.add_middleware(GuardMiddleware, service=service, token=config.token)
    app.add_middleware(DrainUnreadBody, max_bytes=config.max_bytes)  # outermost: sees 401s too
    return app


def serve(config: ServeConfig) -> None:
    """Load the model and serve until interrupted (blocking)."""
    try:
        import uvicorn
    except ImportError:
        raise _missing_extra() from None
    app = create_app(config)
    uvicorn.run(
        app, host=config.host, port=config.port, log_level="info",
        access_log=config.access_log, timeout_graceful_shutdown=5,
    )  # fmt: skip
