"""`kidney-edge serve` against its own OpenAPI document: what /openapi.json promises is what
the running server answers.

A real uvicorn server on a loopback port serves the tiny CAM model. schemathesis reads the
server's /openapi.json and, for every operation, sends its coverage cases (boundary and
malformed values: ``cam=null``, missing or empty bodies, undocumented methods) and fuzzed
requests that the document allows and that it does not; every answer must carry a documented
status, Content-Type and headers, and a body that matches that status's schema. JSON Schema
cannot say "a decodable image", so the document's 422 (an image that cannot be decoded) counts
as an acceptable answer to schema-valid bytes; the hypothesis test below sends real images of
every accepted format, raw, as a form and as a batch, and holds their 200 answers to the
document too.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
import jsonschema  # noqa: E402
import requests  # noqa: E402
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from test_serve import live_server, loopback, make_cam_onnx  # noqa: E402, F401 (loopback: a fixture)

from kidney_edge.runtime.serve.limits import MULTIPART  # noqa: E402
from kidney_edge.spec import ModelSpec  # noqa: E402

MAX_BYTES = 1 << 20  # small limits, so generated requests also meet the 413 paths
MAX_FILES = 4
TOKEN = "s3cret"  # the locked server's --token
EXAMPLES = 20  # per operation and phase; the whole file runs in seconds on 2 cores
GENERATION = {"max-examples": EXAMPLES, "database": "none"}
# Schema-valid bytes need not be a decodable image: the document answers those with 422.
# A request the document does not allow is refused with one of the documented refusals (too
# many files, beyond maxItems, is a 413).
REFUSALS = ["400", "401", "405", "413", "415", "422"]
ACCEPTED = {
    "positive_data_acceptance": {"expected-statuses": ["2xx", "422"]},
    "negative_data_rejection": {"expected-statuses": REFUSALS},
}
CONTRACT = SchemathesisConfig.from_dict({"generation": GENERATION, "checks": ACCEPTED})
# Without the token every request is refused before routing, an undeclared method included
# (401, not 405): a client without the token learns nothing about the routes.
LOCKED = SchemathesisConfig.from_dict(
    {
        "generation": GENERATION,
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "422"]},
            "negative_data_rejection": {"expected-statuses": REFUSALS},
            "unsupported_method": {"enabled": False},
        },
    }
)
# What an image may be sent as: (Pillow format, the Content-Type a client declares).
FORMATS = [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("BMP", "image/bmp"),
           ("TIFF", "image/tiff"), ("PNG", "application/octet-stream")]  # fmt: skip

pytestmark = pytest.mark.usefixtures("loopback")  # the tests' requests go to 127.0.0.1 only


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cam_onnx(tmp_path_factory.mktemp("contract-model") / "model.onnx")


@pytest.fixture(scope="module")
def base_url(model: Path) -> Iterator[str]:
    with live_server(model, max_bytes=MAX_BYTES, max_files=MAX_FILES) as url:
        yield url


@pytest.fixture(scope="module")
def locked_url(model: Path) -> Iterator[str]:
    with live_server(model, token=TOKEN) as url:
        yield url


# The schema fixtures name `loopback` themselves: schemathesis resolves them outside pytestmark.
@pytest.fixture
def api_schema(base_url: str, loopback: None) -> Any:  # noqa: F811
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=CONTRACT)


@pytest.fixture
def locked_api_schema(locked_url: str, loopback: None) -> Any:  # noqa: F811
    """The document as a client with the token reads it; requests then go without the token."""
    document = requests.get(
        f"{locked_url}/openapi.json", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
    ).json()
    schema = schemathesis.openapi.from_dict(document, config=LOCKED)
    schema.config.update(base_url=locked_url)
    return schema


contract = schemathesis.pytest.from_fixture("api_schema")
locked_contract = schemathesis.pytest.from_fixture("locked_api_schema")


@contract.parametrize()
def test_every_answer_is_one_the_document_describes(case: Any) -> None:
    case.call_and_validate(timeout=30)


@locked_contract.parametrize()
def test_refusals_without_the_token_are_documented_too(case: Any) -> None:
    assert case.call_and_validate(timeout=30).status_code == 401


# --------------------------------------------------------------------------- decodable images


@pytest.fixture
def document(base_url: str) -> dict[str, Any]:
    return requests.get(f"{base_url}/openapi.json", timeout=30).json()


def documented(document: dict[str, Any], path: str, status: int, body: Any) -> None:
    """``body`` is what ``path``'s POST documents for ``status`` (its schema, with $refs resolved)."""
    responses = document["paths"][path]["post"]["responses"]
    assert str(status) in responses, f"{path} answered an undocumented {status}: {body}"
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    jsonschema.validate(body, {**schema, "components": document["components"]})


@st.composite
def image_files(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """(file name, bytes, declared Content-Type): a random image in an accepted format."""
    image_format, declared = draw(st.sampled_from(FORMATS))
    mode = draw(st.sampled_from(["L", "RGB"]))
    height, width = draw(st.integers(8, 96)), draw(st.integers(8, 96))
    seed = draw(st.integers(0, 2**32 - 1))
    shape = (height, width) if mode == "L" else (height, width, 3)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=image_format)
    return f"slice.{image_format.lower()}", buffer.getvalue(), declared


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    image=image_files(),
    batch=st.lists(image_files(), min_size=1, max_size=MAX_FILES - 1),
    as_form=st.booleans(),
    cam=st.booleans(),
)
def test_decodable_images_get_the_documented_answer(
    base_url: str,
    document: dict[str, Any],
    image: tuple[str, bytes, str],
    batch: list[tuple[str, bytes, str]],
    as_form: bool,
    cam: bool,
) -> None:
    params = {"cam": str(cam).lower()}
    name, data, declared = image
    if as_form:
        one = requests.post(f"{base_url}/v1/predict", params=params, files={"file": image}, timeout=30)
    else:
        headers = {"content-type": declared}
        one = requests.post(f"{base_url}/v1/predict", params=params, data=data, headers=headers, timeout=30)
    assert one.status_code == 200, one.text
    documented(document, "/v1/predict", 200, one.json())
    assert one.json()["filename"] == (name if as_form else None)
    assert (one.json()["activation"] is not None) == cam

    parts = [("files", file) for file in batch] + [("files", ("junk.png", b"not pixels", "image/png"))]
    many = requests.post(f"{base_url}/v1/predict/batch", params=params, files=parts, timeout=30)
    assert many.status_code == 200, many.text
    documented(document, "/v1/predict/batch", 200, many.json())
    *answers, junk = many.json()["results"]
    assert [answer["label"] in ModelSpec().class_names for answer in answers] == [True] * len(batch)
    assert junk["status"] == 422 and junk["filename"] == "junk.png"


def test_every_upload_route_documents_its_bodies_and_errors(document: dict[str, Any]) -> None:
    single = document["paths"]["/v1/predict"]["post"]
    batch = document["paths"]["/v1/predict/batch"]["post"]
    assert set(single["requestBody"]["content"]) == {
        MULTIPART, "application/dicom", "application/octet-stream", "image/bmp", "image/jpeg",
        "image/png", "image/tiff", "image/x-ms-bmp",
    }  # fmt: skip
    assert set(batch["requestBody"]["content"]) == {MULTIPART}
    assert batch["requestBody"]["content"][MULTIPART]["schema"]["properties"]["files"]["type"] == "array"
    error = {"$ref": "#/components/schemas/ErrorOut"}
    for operation in (single, batch):
        for status in ("400", "401", "413", "415", "422", "500", "503"):
            assert operation["responses"][status]["content"]["application/json"]["schema"] == error
    assert "security" not in document  # no --token: nothing to send
    for path in ("/v1/model", "/healthz", "/metrics"):
        for status in ("401", "500"):
            responses = document["paths"][path]["get"]["responses"]
            assert responses[status]["content"]["application/json"]["schema"] == error
    assert document["components"]["schemas"]["ErrorOut"]["properties"]["detail"]["type"] == "string"
    assert "HTTPValidationError" not in document["components"]["schemas"]  # FastAPI's list shape


def test_a_token_is_documented_as_bearer_security(locked_url: str) -> None:
    document = requests.get(
        f"{locked_url}/openapi.json", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
    ).json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["security"] == [{"bearer": []}]


def test_the_model_card_is_documented(base_url: str, document: dict[str, Any]) -> None:
    card = requests.get(f"{base_url}/v1/model", timeout=30).json()
    schema = document["paths"]["/v1/model"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ]
    jsonschema.validate(card, {**schema, "components": document["components"]})
    assert card["limits"] == {"max_bytes": MAX_BYTES, "max_files": MAX_FILES, "max_queue": 64}
