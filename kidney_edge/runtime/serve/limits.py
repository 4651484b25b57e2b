"""What a request may be, checked before any pixel is decoded, and the errors that say why not.

Every refusal is a :class:`RequestError` (an :class:`~kidney_edge.errors.InputError`) carrying
its HTTP status; an unreadable image is the library's own
:class:`~kidney_edge.errors.ImageReadError` (422). Bodies are read into memory with a byte
limit and multipart forms are parsed there: nothing uploaded touches the disk. A refusal sent
before the body is read waits for the rest of the body, read and discarded up to a bound
(:class:`DrainUnreadBody`), so that a client that writes its whole body first reads it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from kidney_edge.errors import ImageReadError, InputError, KidneyEdgeError

# Declared types an image may arrive with. The decoder decides what the bytes really are;
# this list only turns away clients that say they are sending something else.
IMAGE_MEDIA_TYPES = frozenset({
    "image/jpeg", "image/png", "image/bmp", "image/x-ms-bmp", "image/tiff", "application/dicom",
    "application/octet-stream",
})  # fmt: skip
MULTIPART = "multipart/form-data"
RETRY_AFTER_S = 1  # a queue of a few batches drains in about a second on a 2-core machine
# An early refusal (413 on the declared size, 401, 503) is held back while the rest of the body
# is read and discarded, up to DRAIN_FACTOR x --max-bytes and DRAIN_TIMEOUT_S: an HTTP/1.1 server
# that closes with unread bytes in its socket makes the kernel send a reset, and a client that
# writes its whole body before reading (Python's urllib, most generated clients) then sees
# "connection reset" instead of the answer. Past the bound the answer goes out with
# `Connection: close`: bandwidth spent on a refused body stays bounded, memory is never spent.
DRAIN_FACTOR = 4
DRAIN_TIMEOUT_S = 30.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestError(InputError):
    """A request the service refuses; ``status`` is the HTTP status it answers with."""

    status = 400
    headers: Mapping[str, str] = {}


class Unauthorized(RequestError):
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(RequestError):
    status = 413


class UnsupportedMediaType(RequestError):
    status = 415


class ServerBusy(RequestError):
    status = 503
    headers = {"Retry-After": str(RETRY_AFTER_S)}


def http_status(error: KidneyEdgeError) -> int:
    """The HTTP status of a library error: its own, 422 for an unreadable image, else 400/500."""
    if isinstance(error, RequestError):
        return error.status
    if isinstance(error, ImageReadError):
        return 422
    return 400 if isinstance(error, InputError) else 500


@dataclass(frozen=True)
class Upload:
    """One uploaded file, in memory. ``filename`` is the client's: echoed, never used as a path."""

    data: bytes
    filename: str | None
    media_type: str


def media_type(content_type: str | None) -> str:
    """``image/png; charset=x`` -> ``image/png``; '' when missing."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"upload too large: the limit is {max_bytes:,} bytes (--max-bytes); send a smaller image"
    )


async def read_body(headers: Mapping[str, str], chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The request body, refusing (413) a declared or streamed size over ``max_bytes`` without
    reading further."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise RequestError(f"Content-Length {declared!r} is not a number") from None
        if length > max_bytes:
            raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)


def validation_detail(errors: Sequence[Mapping[str, Any]]) -> str:
    """The framework's request-validation errors (pydantic's ``loc``/``msg``/``input`` records)
    as one sentence, e.g. ``query parameter cam='null': Input should be a valid boolean``."""
    problems = []
    for error in errors:
        where, *name = [str(part) for part in error.get("loc", ())] or ["request"]
        subject = f"{where} parameter {'.'.join(name)}" if name else where
        if "input" in error and error["input"] is not None and name:
            given = repr(error["input"])
            subject += "=" + (given if len(given) <= 80 else given[:77] + "...")  # echo, bounded
        problems.append(f"{subject}: {error.get('msg', 'invalid')}")
    return "; ".join(problems) + "; the parameters are described at /openapi.json"


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class DrainUnreadBody:
    """Pure ASGI: a response that starts before the request body has been read to its end waits
    until the rest is read and discarded (at most ``limit`` bytes in ``timeout_s``); past the
    bound it goes out with ``Connection: close``. Bodies the app reads pass through untouched."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        self.app, self.limit, self.timeout_s = app, DRAIN_FACTOR * max_bytes, timeout_s

    async def _drain(self, receive: Receive) -> bool:
        """Read and discard up to ``limit`` bytes; whether the body (or the client) ended."""
        drained = 0
        while drained <= self.limit:
            message = await receive()
            if message["type"] == "http.disconnect":
                return True
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False

    async def _drained(self, scope: Scope, receive: Receive) -> bool:
        declared = _declared_length(scope)
        if declared is not None and declared > self.limit:
            return False  # not worth reading: answer now and close
        try:
            return await asyncio.wait_for(self._drain(receive), self.timeout_s)
        except asyncio.TimeoutError:
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_ended = False

        async def receive_and_note() -> Message:
            nonlocal body_ended
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_ended = True
            return message

        async def drain_then_send(message: Message) -> None:
            nonlocal body_ended
            if message["type"] == "http.response.start" and not body_ended:
                body_ended = True  # drained now, or never: the answer goes out either way
                if not await self._drained(scope, receive):
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_and_note, drain_then_send)


def _accepted_types() -> str:
    return ", ".join(sorted(IMAGE_MEDIA_TYPES))


def parse_uploads(
    content_type: str | None, body: bytes, *, max_files: int, raw_body: bool = True
) -> list[Upload]:
    """The files of a request: the raw body as one image (when ``raw_body``), or each file part
    of a multipart form.

    Raises UnsupportedMediaType (415) for a declared type that is not an image type (or not
    multipart when ``raw_body`` is False), and RequestError for a form without files or
    PayloadTooLarge (413) for one with more than ``max_files``.
    """
    kind = media_type(content_type)
    if kind == MULTIPART:
        uploads = _parse_multipart(content_type or "", body)
    elif kind in IMAGE_MEDIA_TYPES and raw_body:
        uploads = [Upload(body, None, kind)]
    elif not raw_body:
        raise UnsupportedMediaType(
            f"Content-Type {kind or '(none)'} is not accepted here: send the images as {MULTIPART} "
            "file parts (one raw image goes to /v1/predict)"
        )
    else:
        raise UnsupportedMediaType(
            f"Content-Type {kind or '(none)'} is not accepted: send the image as the raw body with "
            f"Content-Type one of {_accepted_types()}, or as {MULTIPART} file parts"
        )
    for upload in uploads:
        if upload.media_type not in IMAGE_MEDIA_TYPES:
            raise UnsupportedMediaType(
                f"file {upload.filename!r} has Content-Type {upload.media_type}, not an image type "
                f"kidney-edge reads ({_accepted_types()}); JPEG, PNG, BMP, TIFF and DICOM are supported"
            )
    if not uploads:
        raise RequestError(f"the {MULTIPART} body has no file part; send the image as a file field")
    if len(uploads) > max_files:
        raise PayloadTooLarge(f"{len(uploads)} files in one request; the limit is {max_files} (--max-files)")
    return uploads


class _PartCollector:
    """python-multipart callbacks that keep each part's headers and bytes in memory."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[bytes, bytes], bytearray]] = []
        self._field = self._value = b""

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._append("_field", data[start:end]),
            "on_header_value": lambda data, start, end: self._append("_value", data[start:end]),
            "on_header_end": self._header_end,
            "on_part_data": lambda data, start, end: self.parts[-1][1].extend(data[start:end]),
        }

    def _append(self, name: str, data: bytes) -> None:
        setattr(self, name, getattr(self, name) + data)

    def _part_begin(self) -> None:
        self.parts.append(({}, bytearray()))

    def _header_end(self) -> None:
        self.parts[-1][0][self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""


def _parse_multipart(content_type: str, body: bytes) -> list[Upload]:
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestError(f"{MULTIPART} Content-Type without a boundary parameter")
    collector = _PartCollector()
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own (and ValueError) for broken forms
        raise RequestError(f"malformed {MULTIPART} body ({type(exc).__name__}: {exc})") from None
    uploads = []
    for headers, data in collector.parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        filename = disposition.get(b"filename")
        if filename is None:
            continue  # a plain form field, not a file
        declared = media_type(headers.get(b"content-type", b"application/octet-stream").decode("latin-1"))
        uploads.append(Upload(bytes(data), filename.decode("utf-8", "replace")[:255], declared))
    return uploads
