"""The JSON the API answers with, as pydantic models: they document the OpenAPI schema at /docs
and /openapi.json. Handlers build plain dicts (service.InferenceService.answer); these models
describe them and are not run per request."""

from __future__ import annotations

from pydantic import BaseModel, Field


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
    detail: str = Field(description="what was wrong and how to fix it")


class HealthOut(BaseModel):
    status: str
    in_flight: int
    model: ModelIdentityOut
