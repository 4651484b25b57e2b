"""What a request may be, checked before any pixel is decoded, and the errors that say why not.

Every refusal is a :class:`RequestError` (an :class:`~kidney_edge.errors.InputError`) carrying
its HTTP status; an unreadable image is the library's own
:class:`~kidney_edge.errors.ImageReadError` (422). Bodies are read into memory with a byte
limit and multipart forms are parsed there: nothing uploaded touches the disk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from kidney_edge.errors import ImageReadError, InputError, KidneyEdgeError

# Declared types an image may arrive with. The decoder decides what the bytes really are;
# this list only turns away clients that say they are sending something else.
IMAGE_MEDIA_TYPES = frozenset({
    "image/jpeg", "image/png", "image/bmp", "image/x-ms-bmp", "image/tiff", "application/dicom",
    "application/octet-stream",
})  # fmt: skip
MULTIPART = "multipart/form-data"
RETRY_AFTER_S = 1  # a queue of a few batches drains in about a second on a 2-core machine


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


def _accepted_types() -> str:
    return ", ".join(sorted(IMAGE_MEDIA_TYPES))


def parse_uploads(content_type: str | None, body: bytes, *, max_files: int) -> list[Upload]:
    """The files of a request: the raw body as one image, or each file part of a multipart form.

    Raises UnsupportedMediaType (415) for a declared type that is not an image type, and
    RequestError for a form without files or with more than ``max_files``.
    """
    kind = media_type(content_type)
    if kind == MULTIPART:
        uploads = _parse_multipart(content_type or "", body)
    elif kind in IMAGE_MEDIA_TYPES:
        uploads = [Upload(body, None, kind)]
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
