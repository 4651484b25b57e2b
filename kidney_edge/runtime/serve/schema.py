"""The API's contract as /openapi.json publishes it: the JSON answers as pydantic models, the
request bodies each upload route reads, and the error answers of every route.

Handlers build plain dicts (service.InferenceService.answer); these models describe them and are
not run per request. tests/test_serve_contract.py checks the running server against the document.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from kidney_edge.runtime.serve.limits import IMAGE_MEDIA_TYPES, MULTIPART


class RuleOut(BaseModel):
    kind: str = Field(description="argmax, or threshold: the positive class wherever p >= threshold")
    positive_class: str | None
    threshold: float | None
    fired: bool | None = Field(description="p(positive class) >= threshold; null for an argmax rule")
    description: str


class ModelIdentityOut(BaseModel):
    file: str
    sha256: str = Field(description="sha256 of the ONNX file being served")
    spec_schema_version: int
    toolkit_version: str
    precision: str = Field(description="fp32 or int8")


class ActivationOut(BaseModel):
    view_png: str = Field(description="the model's input view (resized), a PNG data URL")
    overlay_png: str | None = Field(
        description="class activation map over the view; null without a cam output"
    )
    slice_overlay_png: str | None = Field(
        None,
        description="the activation map drawn back onto the whole decoded slice, the model's region "
        "outlined; null without a cam output or where the view is the whole slice",
    )
    note: str | None


class PredictionOut(BaseModel):
    filename: str | None = Field(
        description="the client's file name (multipart), echoed; null for a raw body"
    )
    label: str = Field(description="under the model's decision rule; 'unknown' when its OOD detector rejects")
    argmax_label: str
    confidence: float | None
    probabilities: dict[str, float] = Field(description="temperature-calibrated, summing to 1")
    ood_score: float | None = Field(None, description="the OOD detector's score; null without a detector")
    rule: RuleOut
    model: ModelIdentityOut
    latency_ms: dict[str, float] = Field(description="decode, queue, inference (the batch's), total")
    batch_size: int = Field(description="images in the ONNX call this one rode in")
    saved_as: str | None = Field(description="server-chosen file name under --save-dir; null when not saving")
    activation: ActivationOut | None = Field(description="only with ?cam=true")


class FileErrorOut(BaseModel):
    filename: str | None
    status: int
    detail: str


class BatchOut(BaseModel):
    results: list[PredictionOut | FileErrorOut] = Field(description="one per file part, in order")


class ErrorOut(BaseModel):
    """Every error the server answers, its own refusals and the framework's alike."""

    detail: str = Field(description="what was wrong and how to fix it")


class HealthOut(BaseModel):
    status: str = Field(description="ready (200), or starting (503) until the batcher runs")
    in_flight: int
    model: ModelIdentityOut


class CtWindowOut(BaseModel):
    level: float
    width: float


class FiguresOut(BaseModel):
    source: str
    images: str | None = None
    n_images: int | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    positive_recall: float | None = None
    positive_class: str | None = None


class LimitsOut(BaseModel):
    max_bytes: int = Field(description="largest request body in bytes (--max-bytes)")
    max_files: int = Field(description="most file parts in one request (--max-files)")
    max_queue: int = Field(description="most images in flight before 503 (--max-queue)")


class ModelCardOut(BaseModel):
    arch: str
    classes: list[str] = Field(description="class names in the model's index order")
    positive_class: str | None
    input_size: int
    region: str = Field(
        description="what of each slice the model sees: 'whole', or 'kidneys' (the band about the spine "
        "that holds both kidneys, found in each image; the whole image where none is found)"
    )
    region_description: str = Field(description="the region rule in words, as the model card says it")
    resize: str
    color_mode: str
    ct_window: CtWindowOut = Field(description="the CT window (HU) DICOM uploads are read with")
    temperature: float
    decision_rule: str
    ood_detector: str | None = Field(description="the unknown-input rule; null without a detector")
    has_cam: bool = Field(description="whether ?cam=true can draw a class activation map")
    precision_reason: str | None
    figures: FiguresOut | None = Field(description="held-out figures from parity.json beside the model")
    data_fingerprint: str | None
    model: ModelIdentityOut
    intended_use: str
    limits: LimitsOut


# --------------------------------------------------------------------------- request bodies

_BINARY = {"type": "string", "format": "binary"}
_IMAGE_TYPES = ", ".join(sorted(IMAGE_MEDIA_TYPES))


def _raw_image_body() -> dict[str, Any]:
    return {kind: {"schema": _BINARY} for kind in sorted(IMAGE_MEDIA_TYPES)}


def predict_body(max_bytes: int) -> dict[str, Any]:
    """``openapi_extra`` of ``POST /v1/predict``: one image, raw or as one multipart file part."""
    form = {
        "schema": {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]},
        "encoding": {"file": {"contentType": _IMAGE_TYPES}},
    }
    return {
        "requestBody": {
            "required": True,
            "description": "one JPEG, PNG, BMP, TIFF or DICOM image: the raw body with its "
            f"Content-Type, or one file part of a {MULTIPART} form (any field name; the part's "
            f"file name is echoed as `filename`); at most {max_bytes:,} bytes in all (--max-bytes)",
            "content": {**_raw_image_body(), MULTIPART: form},
        }
    }


def batch_body(max_bytes: int, max_files: int) -> dict[str, Any]:
    """``openapi_extra`` of ``POST /v1/predict/batch``: several multipart file parts."""
    files = {"type": "array", "items": _BINARY, "minItems": 1, "maxItems": max_files}
    form = {
        "schema": {"type": "object", "properties": {"files": files}, "required": ["files"]},
        "encoding": {"files": {"contentType": _IMAGE_TYPES}},
    }
    return {
        "requestBody": {
            "required": True,
            "description": f"a {MULTIPART} form of up to {max_files} file parts (--max-files; "
            "any field name), each a JPEG, PNG, BMP, TIFF or DICOM image; at most "
            f"{max_bytes:,} bytes in all (--max-bytes)",
            "content": {MULTIPART: form},
        }
    }


# --------------------------------------------------------------------------- error answers

_ERROR_CAUSES = {
    400: "malformed request: a multipart body without a boundary or without a file part, or "
    "several files sent to /v1/predict",
    401: "missing or wrong `Authorization: Bearer <token>` (only when the server runs with --token)",
    413: "request body over --max-bytes, or more file parts than --max-files",
    415: "Content-Type (of the body or of a file part) is not one of the accepted image types "
    f"({_IMAGE_TYPES}) or {MULTIPART}",
    422: "a query parameter that does not parse (e.g. cam=maybe), or an image that cannot be "
    "decoded (empty, truncated, not an image, a decompression bomb)",
    500: "unexpected failure: the exception's type only; the server log has the traceback",
    503: "queue full (--max-queue): retry after the Retry-After seconds",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
}
UPLOAD_ERRORS = (400, 401, 413, 415, 422, 500, 503)
READ_ERRORS = (401, 500)


def error_responses(
    statuses: tuple[int, ...], *, by_reference: bool = False
) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses`` entries: each status answered with :class:`ErrorOut` as JSON, and why.

    ``by_reference`` for a route whose own answer is not JSON (``/metrics``): FastAPI files a
    ``model`` under the route's media type, so these name ErrorOut's component instead (the
    upload routes, which name the model, put it in the document).
    """
    if by_reference:
        body = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
    else:
        body = {"model": ErrorOut}
    return {
        status: {**body, "description": _ERROR_CAUSES[status],
                 **({"headers": _ERROR_HEADERS[status]} if status in _ERROR_HEADERS else {})}
        for status in statuses
    }  # fmt: skip
