"""`kidney-edge serve`: answers equal predict's rows, every limit and bad input, the token, the bind address.

Tiny ONNX models (test_runtime.make_tiny_onnx, and one here with a `cam` output) keep every
request to milliseconds; the app runs in-process under Starlette's TestClient, or in a real
uvicorn server on a loopback port (:func:`live_server`) where the socket's behaviour matters.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
with warnings.catch_warnings():  # starlette asks for httpx2; httpx is the client of the serve extra
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402
from _factories import SIZE, make_cam_onnx, make_tiny_onnx  # noqa: E402
from test_runtime import bomb_png  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from kidney_edge.errors import ImageReadError, InputError  # noqa: E402
from kidney_edge.imaging import load_image, preprocess  # noqa: E402
from kidney_edge.runtime import OnnxClassifier, classify_paths  # noqa: E402
from kidney_edge.runtime.serve import ServeConfig, create_app, exposure_warning, is_loopback  # noqa: E402
from kidney_edge.runtime.serve.batcher import DynamicBatcher  # noqa: E402
from kidney_edge.runtime.serve.limits import (  # noqa: E402
    DRAIN_FACTOR,
    DrainUnreadBody,
    PayloadTooLarge,
    read_body,
)
from kidney_edge.spec import ModelSpec  # noqa: E402


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def gray_png(level: int = 200, size: int = SIZE) -> bytes:
    return png_bytes(np.full((size, size), level, np.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-models")
    return {
        "plain": make_tiny_onnx(root / "plain" / "model.onnx"),
        "cam": make_cam_onnx(root / "cam" / "model.onnx"),
    }


@contextmanager
def serving(model: Path, **options: Any) -> Iterator[TestClient]:
    config = ServeConfig(model=model, **{"threads": 1, "workers": 1, **options})
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        yield client


_CONNECT, _CREATE_CONNECTION = socket.socket.connect, socket.create_connection  # before conftest's refusal


@pytest.fixture
def loopback(no_network: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections to 127.0.0.1 only (a :func:`live_server`); any other address still fails loudly."""

    def connect(sock: socket.socket, address: Any) -> None:
        if not (isinstance(address, tuple) and address[0] == "127.0.0.1"):
            raise RuntimeError(f"network access attempted in a test: {address!r}")
        _CONNECT(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", _CREATE_CONNECTION)  # it calls connect above


@contextmanager
def live_server(model: Path, **options: Any) -> Iterator[str]:
    """A real uvicorn server in a thread on a free 127.0.0.1 port; yields its base URL."""
    import uvicorn

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket over
    port = listener.getsockname()[1]
    config = ServeConfig(model=model, **{"threads": 1, "workers": 1, "port": port, **options})
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start within 30 s"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


@pytest.fixture(scope="module")
def client(models: dict[str, Path]) -> Iterator[TestClient]:
    with serving(models["plain"]) as test_client:
        yield test_client


def post_png(client: TestClient, data: bytes, path: str = "/v1/predict", **kwargs: Any) -> Any:
    return client.post(
        path, content=data, headers={"content-type": "image/png", **kwargs.pop("headers", {})}, **kwargs
    )


# --------------------------------------------------------------------------- in-memory decoding


def test_bytes_and_file_objects_preprocess_like_the_file(tmp_path: Path) -> None:
    spec = ModelSpec(input_size=SIZE)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 52), dtype=np.uint8)
    for suffix in (".png", ".jpg", ".bmp", ".tif"):
        path = tmp_path / f"slice{suffix}"
        Image.fromarray(pixels).save(path)
        data = path.read_bytes()
        expected = preprocess(path, spec)
        np.testing.assert_array_equal(preprocess(data, spec), expected)
        np.testing.assert_array_equal(preprocess(io.BytesIO(data), spec), expected)
        with open(path, "rb") as handle:
            np.testing.assert_array_equal(preprocess(handle, spec), expected)


def test_in_memory_errors_name_the_upload() -> None:
    spec = ModelSpec(input_size=SIZE)
    named = io.BytesIO(b"plain text, not pixels")
    named.name = "notes.png"
    with pytest.raises(ImageReadError, match=r"^notes\.png: not an image"):
        load_image(named, spec)
    with pytest.raises(ImageReadError, match=r"^<upload>: file is empty"):
        load_image(b"", spec)
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        load_image(gray_png()[:60], spec)


def test_dicom_bytes_decode_like_the_dicom_file(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from test_dicom import make_ct_dicom

    stored = np.random.default_rng(1).integers(0, 2000, (40, 40)).astype(np.uint16)
    path = make_ct_dicom(tmp_path / "ct.dcm", stored)
    spec = ModelSpec(input_size=SIZE)
    np.testing.assert_array_equal(preprocess(path.read_bytes(), spec), preprocess(path, spec))


# --------------------------------------------------------------------------- answers


def test_answer_is_predicts_row_with_model_identity_and_latency(
    client: TestClient, models: dict[str, Path], tmp_path: Path
) -> None:
    image = tmp_path / "slice.png"
    image.write_bytes(gray_png(170))
    (row,) = classify_paths([str(image)], OnnxClassifier(models["plain"], threads=1))
    answer = post_png(client, image.read_bytes())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["label"] == row["label"] and body["argmax_label"] == row["argmax_label"]
    assert body["confidence"] == row["confidence"]
    assert body["probabilities"] == {name: row[f"p_{name}"] for name in ModelSpec().class_names}
    assert body.get("ood_score") == row.get("ood_score")
    assert body["rule"] == {"kind": "argmax", "positive_class": "Tumor", "threshold": None, "fired": None,
                            "description": "argmax"}  # fmt: skip
    assert body["model"]["sha256"] == hashlib.sha256(models["plain"].read_bytes()).hexdigest()
    assert body["model"]["spec_schema_version"] == ModelSpec().schema_version
    latency = body["latency_ms"]
    assert set(latency) == {"decode", "queue", "inference", "total"}
    assert min(latency.values()) >= 0 and latency["total"] >= latency["decode"] + latency["inference"]
    assert body["filename"] is None and body["saved_as"] is None and body["activation"] is None


def test_a_region_model_answers_as_predict_does(tmp_path: Path) -> None:
    """Serve brings uploads to the model's view off the batch thread; the batch must not look for
    the kidney band again inside the cropped view."""
    from test_regions import axial_slice

    from kidney_edge.imaging import resized_image
    from kidney_edge.regions import region_box
    from kidney_edge.spec import RegionRule

    spec = ModelSpec(input_size=128, region=RegionRule.KIDNEYS)  # a view large enough to search again
    model = make_tiny_onnx(tmp_path / "m.onnx", spec)
    image = tmp_path / "slice.png"
    axial_slice().save(image)
    view = resized_image(axial_slice(), spec)
    assert region_box(axial_slice(), RegionRule.KIDNEYS) is not None  # the band is found and cropped
    assert region_box(view, RegionRule.KIDNEYS) is not None  # and would be "found" inside the view
    (row,) = classify_paths([str(image)], OnnxClassifier(model, threads=1))
    with serving(model) as client:
        body = post_png(client, image.read_bytes()).json()
    assert body["probabilities"] == {name: row[f"p_{name}"] for name in ModelSpec().class_names}


def test_threshold_rule_says_whether_it_fired(tmp_path: Path) -> None:
    from kidney_edge.spec import DecisionRule

    rule = DecisionRule(kind="threshold", positive_class="Tumor", threshold=0.0)  # fires for every image
    model = make_tiny_onnx(tmp_path / "m.onnx", ModelSpec(input_size=SIZE, decision_rule=rule))
    with serving(model) as client:
        body = post_png(client, gray_png(10)).json()
    assert body["label"] == "Tumor" and body["argmax_label"] != "Tumor"
    assert body["rule"]["fired"] is True and body["rule"]["threshold"] == 0.0


def test_multipart_and_dicom_uploads(client: TestClient, models: dict[str, Path], tmp_path: Path) -> None:
    answer = client.post("/v1/predict", files={"file": ("left kidney.png", gray_png(90), "image/png")})
    assert answer.status_code == 200 and answer.json()["filename"] == "left kidney.png"
    pytest.importorskip("pydicom")
    from test_dicom import make_ct_dicom

    dicom = make_ct_dicom(tmp_path / "ct.dcm", np.full((48, 48), 1100, np.uint16))
    (row,) = classify_paths([str(dicom)], OnnxClassifier(models["plain"], threads=1))
    raw = client.post(
        "/v1/predict", content=dicom.read_bytes(), headers={"content-type": "application/dicom"}
    )
    form = client.post(
        "/v1/predict", files={"file": ("ct.dcm", dicom.read_bytes(), "application/octet-stream")}
    )
    for answer in (raw, form):
        assert answer.status_code == 200, answer.text
        assert answer.json()["probabilities"]["Tumor"] == row["p_Tumor"]


def test_batch_answers_each_file_in_order(client: TestClient) -> None:
    files = [
        ("files", ("dark.png", gray_png(5), "image/png")),
        ("files", ("junk.png", b"not an image", "image/png")),
        ("files", ("bright.png", gray_png(250), "image/png")),
    ]
    answer = client.post("/v1/predict/batch", files=files)
    assert answer.status_code == 200, answer.text
    dark, junk, bright = answer.json()["results"]
    assert (dark["filename"], bright["filename"]) == ("dark.png", "bright.png")
    assert dark["label"] != bright["label"]  # the tiny model separates by brightness
    assert junk == {"filename": "junk.png", "status": 422,
                    "detail": "not an image Pillow can read (unknown format or not an image)"}  # fmt: skip


def test_concurrent_requests_share_one_onnx_call(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving(models["plain"], max_batch=4, max_wait_ms=1000, workers=4) as client:
        service = client.app.state.service
        together = threading.Barrier(4, timeout=30)  # the four uploads finish decoding at once
        decode = service._decode
        monkeypatch.setattr(service, "_decode", lambda upload: (together.wait(), decode(upload))[1])
        before = service.batcher.batches
        answers: list[Any] = [None] * 4

        def send(index: int) -> None:
            answers[index] = post_png(client, gray_png(40 * index))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert [a.status_code for a in answers] == [200] * 4
        assert [a.json()["batch_size"] for a in answers] == [4] * 4
        assert service.batcher.batches - before == 1
        assert 'kidney_edge_batch_size_bucket{le="4"} 1' in client.get("/metrics").text


def test_a_lone_request_does_not_wait_for_partners(models: dict[str, Path]) -> None:
    with serving(models["plain"], max_wait_ms=1000) as client:
        body = post_png(client, gray_png()).json()
    assert body["batch_size"] == 1 and body["latency_ms"]["queue"] < 500  # not the 1000 ms wait


def test_max_batch_defaults_to_predicts_batch_for_the_models_input(models, tmp_path: Path) -> None:
    from kidney_edge.runtime.serve.service import InferenceService

    large = make_tiny_onnx(tmp_path / "large" / "model.onnx", ModelSpec(input_size=448))
    assert InferenceService(ServeConfig(model=large, threads=1, workers=1)).batcher.max_batch == 2
    assert InferenceService(ServeConfig(model=models["plain"], threads=1, workers=1)).batcher.max_batch == 8
    assert (
        InferenceService(ServeConfig(model=large, max_batch=5, threads=1, workers=1)).batcher.max_batch == 5
    )


def test_batcher_splits_at_max_batch_keeps_order_and_shares_failures() -> None:
    sizes: list[int] = []

    def run(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if -1 in items:
            raise ValueError("bad item")
        return [item * 10 for item in items]

    async def scenario() -> tuple[list[int], list[int], Exception]:
        batcher = DynamicBatcher(run, max_batch=4, max_wait_s=0.2)
        batcher.start()
        try:
            done = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
            failed = await asyncio.gather(batcher.submit(-1), batcher.submit(7), return_exceptions=True)
        finally:
            await batcher.stop()
        return [d.result for d in done], [d.batch_size for d in done], failed

    results, batch_sizes, failed = asyncio.run(scenario())
    assert results == [i * 10 for i in range(10)]
    assert sizes[:3] == [4, 4, 2] and batch_sizes == [4] * 8 + [2] * 2
    assert all(isinstance(f, ValueError) for f in failed)


def test_batcher_runs_up_to_workers_batches_side_by_side() -> None:
    running, most = 0, 0
    lock = threading.Lock()
    both_in = threading.Barrier(2, timeout=10)  # returns only once two batches run at the same time

    def run(items: list[int]) -> list[int]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            if items[0] < 2:  # the first two batches meet inside run_batch
                both_in.wait()
            return items
        finally:
            with lock:
                running -= 1

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(run, max_batch=1, max_wait_s=0.0, workers=2)
        batcher.start()
        try:
            return [d.result for d in await asyncio.gather(*(batcher.submit(i) for i in range(6)))]
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == list(range(6))
    assert most == 2  # two at once, never three


def test_activation_map_overlay_and_its_absence(models: dict[str, Path]) -> None:
    pixels = np.full((SIZE, SIZE), 255, np.uint8)
    pixels[SIZE // 2 :, SIZE // 2 :] = 0  # a dark quadrant: no evidence for the bright class there
    with serving(models["cam"]) as client:
        assert client.get("/v1/model").json()["has_cam"] is True
        body = post_png(client, png_bytes(pixels), params={"cam": "true"}).json()
    assert body["label"] == "Tumor"  # the brightest class of the CAM model
    activation = body["activation"]
    assert activation["note"] is None and activation["slice_overlay_png"] is None  # the view is the slice
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(activation["overlay_png"].split(",", 1)[1]))))
    view = np.asarray(Image.open(io.BytesIO(base64.b64decode(activation["view_png"].split(",", 1)[1]))))
    assert overlay.shape == view.shape == (SIZE, SIZE, 3)
    hot, cold = overlay[4:12, 4:12].astype(int), overlay[-8:, -8:].astype(int)
    assert (hot[..., 0] < 255).all() and (hot[..., 2] < hot[..., 0]).all()  # red-tinted white: the peak
    np.testing.assert_array_equal(cold, view[-8:, -8:])  # no heat: the grey values untouched
    with serving(models["plain"]) as client:
        assert client.get("/v1/model").json()["has_cam"] is False
        plain = post_png(client, png_bytes(pixels), params={"cam": "true"}).json()["activation"]
    assert plain["overlay_png"] is None and plain["note"] == "no activation map in this model"


def test_a_region_model_draws_its_activation_map_back_onto_the_slice(tmp_path: Path) -> None:
    from test_regions import axial_slice

    from kidney_edge.regions import region_box
    from kidney_edge.runtime.cam import REGION_OUTLINE
    from kidney_edge.spec import RegionRule, ResizeRule

    # Brightened (body 170, kidneys 220, vertebra 255): the CAM model's evidence for its brightest
    # class is brightness, so its heat peaks on a kidney or the vertebra.
    bright = axial_slice().point(lambda value: 0 if value == 0 else min(255, value + 80))
    gray = np.asarray(bright)
    spec = ModelSpec(input_size=64, region=RegionRule.KIDNEYS, resize=ResizeRule.STRETCH)
    with serving(make_cam_onnx(tmp_path / "m.onnx", spec)) as client:
        body = post_png(client, png_bytes(gray), params={"cam": "true"}).json()
        card = client.get("/v1/model").json()
        assert card["region"] == "kidneys" and card["region_description"] == RegionRule.KIDNEYS.description
    assert body["label"] == "Tumor"
    drawn = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(body["activation"]["slice_overlay_png"].split(",", 1)[1])))
    )
    assert drawn.shape == (*gray.shape, 3)  # the whole slice, not the model's view
    left, top, right, bottom = region_box(bright, RegionRule.KIDNEYS)
    np.testing.assert_array_equal(drawn[: top - 1, :, 0], gray[: top - 1])  # in front: the slice untouched
    np.testing.assert_array_equal(drawn[bottom + 1 :, :, 1], gray[bottom + 1 :])  # behind as well
    np.testing.assert_array_equal(drawn[:, : left - 1, 2], gray[:, : left - 1])  # and beside it
    assert tuple(drawn[top, (left + right) // 2]) == REGION_OUTLINE  # what the model saw, outlined
    inside = (slice(top + 3, bottom - 3), slice(left + 3, right - 3))
    redness = drawn[..., 0].astype(int) - drawn[..., 2]  # jet's red: the heat's peak
    y, x = np.unravel_index(np.argmax(redness[inside]), redness[inside].shape)
    assert redness[inside].max() > 60 and gray[y + top + 3, x + left + 3] >= 220


def test_model_card_and_health(client: TestClient) -> None:
    card = client.get("/v1/model").json()
    assert card["classes"] == list(ModelSpec().class_names) and card["input_size"] == SIZE
    assert card["region"] == "whole" and card["region_description"] == "the whole slice"
    assert "not for diagnosis" in card["intended_use"] and card["figures"] is None
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    page = client.get("/")
    assert page.status_code == 200 and "Not a medical device" in page.text
    assert not re.search(r"""(src|href)=["']https?://""", page.text)  # self-contained: no CDN
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


# --------------------------------------------------------------------------- limits and bad input


def test_declared_size_over_the_limit_is_413(models: dict[str, Path]) -> None:
    with serving(models["plain"], max_bytes=1000) as client:
        answer = post_png(client, np.random.default_rng(0).bytes(4000))
        assert answer.status_code == 413
        assert answer.json()["detail"] == (
            "upload too large: the limit is 1,000 bytes (--max-bytes); send a smaller image"
        )
        streamed = client.post("/v1/predict", content=(b"x" * 300 for _ in range(10)),
                               headers={"content-type": "image/png"})  # fmt: skip
        assert streamed.status_code == 413 and "--max-bytes" in streamed.json()["detail"]
        files = [("files", (f"{i}.png", gray_png(), "image/png")) for i in range(3)]
        with serving(models["plain"], max_files=2) as few:
            answer = few.post("/v1/predict/batch", files=files)
        assert answer.status_code == 413 and "limit is 2 (--max-files)" in answer.json()["detail"]


def urllib_post(url: str, data: Any, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """POST with the standard library's client, which writes the whole body before it reads."""
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_a_client_that_sends_the_whole_body_first_reads_the_413(
    models: dict[str, Path], loopback: None
) -> None:
    # Default --max-bytes (32 MiB): 40 MB is refused on its Content-Length before it is read.
    # Closing with the body unread would reset the connection under urllib's feet.
    with live_server(models["plain"]) as url:
        status, body = urllib_post(f"{url}/v1/predict", b"\0" * 40_000_000, {"content-type": "image/png"})
        assert status == 413
        assert body == {
            "detail": "upload too large: the limit is 33,554,432 bytes (--max-bytes); send a smaller image"
        }
        chunks = (b"\0" * (1 << 20) for _ in range(40))  # no Content-Length: chunked, refused mid-stream
        status, body = urllib_post(f"{url}/v1/predict", chunks, {"content-type": "image/png"})
        assert status == 413 and "--max-bytes" in body["detail"]
        status, body = urllib_post(f"{url}/v1/predict", gray_png(), {"content-type": "image/png"})
        assert status == 200 and set(body["probabilities"]) == set(ModelSpec().class_names)
    with live_server(models["plain"], token="s3cret") as url:  # refused before the body is read
        status, body = urllib_post(f"{url}/v1/predict", b"\0" * 8_000_000, {"content-type": "image/png"})
        assert status == 401 and "bearer token" in body["detail"]


def test_unread_body_is_drained_within_its_bound() -> None:
    """The drain reads at most DRAIN_FACTOR x --max-bytes, then answers with Connection: close;
    a declared length over the bound is not read at all."""

    async def refuse_unread(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def run(declared: int | None, chunks: int) -> tuple[int, list[Any]]:
        pulled = 0

        async def receive() -> dict[str, Any]:
            nonlocal pulled
            pulled += 1
            return {"type": "http.request", "body": b"x" * 100, "more_body": pulled < chunks}

        sent: list[Any] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        headers = [] if declared is None else [(b"content-length", str(declared).encode())]
        drain = DrainUnreadBody(refuse_unread, max_bytes=250)
        asyncio.run(drain({"type": "http", "headers": headers}, receive, send))
        return pulled, sent[0]["headers"]

    limit = DRAIN_FACTOR * 250
    assert run(declared=900, chunks=9) == (9, [])  # read to its end: the connection stays usable
    pulled, headers = run(declared=None, chunks=10**6)  # an endless chunked body
    assert pulled == limit // 100 + 1 and headers == [(b"connection", b"close")]
    assert run(declared=limit + 1, chunks=10**6) == (0, [(b"connection", b"close")])


def test_streamed_body_stops_reading_at_the_limit() -> None:
    pulled = 0

    async def chunks():  # no Content-Length: chunked upload
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b"x" * 100

    with pytest.raises(PayloadTooLarge, match="--max-bytes"):
        asyncio.run(read_body({}, chunks(), max_bytes=250))
    assert pulled == 3  # 300 bytes seen: over 250, and not one chunk more


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "file is empty (0 bytes)"),
        (b"GIF89a? no, plain text", "not an image Pillow can read"),
        ("truncated", "corrupt or truncated image"),
        ((10_000, 10_000), "10000x10000 pixels, over the 40,000,000 pixel limit (a decompression bomb"),
        ((100_000, 100_000), "image too large to decode safely"),
    ],
    ids=["empty", "not-an-image", "truncated", "bomb", "huge-bomb"],
)
def test_unreadable_images_are_422_naming_the_problem(
    client: TestClient, tmp_path: Path, content: Any, reason: str
) -> None:
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(buffer, "JPEG")
        content = buffer.getvalue()[:400]
    elif isinstance(content, tuple):  # a header declaring width x height, no pixels behind it
        bomb_png(tmp_path / "bomb.png", *content)
        content = (tmp_path / "bomb.png").read_bytes()
    answer = client.post("/v1/predict", files={"file": ("upload.png", content, "image/png")})
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith("upload.png: ") and reason in answer.json()["detail"]


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        (
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            "Content-Type text/plain is not accepted",
        ),
        (
            {"content": b"{}", "headers": {"content-type": "application/json"}},
            "Content-Type application/json",
        ),
        ({"content": gray_png()}, "Content-Type (none) is not accepted"),
        (
            {"files": {"file": ("anim.gif", b"GIF89a", "image/gif")}},
            "file 'anim.gif' has Content-Type image/gif",
        ),
    ],
    ids=["text", "json", "missing", "gif-part"],
)
def test_wrong_content_type_is_415(client: TestClient, kwargs: dict[str, Any], says: str) -> None:
    answer = client.post("/v1/predict", **kwargs)
    assert answer.status_code == 415 and says in answer.json()["detail"]


def test_batch_takes_multipart_only(client: TestClient) -> None:
    answer = post_png(client, gray_png(), path="/v1/predict/batch")
    assert answer.status_code == 415
    assert answer.json()["detail"] == (
        "Content-Type image/png is not accepted here: send the images as multipart/form-data file "
        "parts (one raw image goes to /v1/predict)"
    )


@pytest.mark.parametrize(
    ("method", "path", "status", "detail"),
    [
        ("post", "/v1/predict?cam=null", 422,
         "query parameter cam='null': Input should be a valid boolean, unable to interpret input; "
         "the parameters are described at /openapi.json"),
        ("post", "/v1/predict/batch?cam=maybe", 422,
         "query parameter cam='maybe': Input should be a valid boolean, unable to interpret input; "
         "the parameters are described at /openapi.json"),
        ("get", "/v2/predict", 404, "Not Found"),
        ("delete", "/v1/predict", 405, "Method Not Allowed"),
    ],
    ids=["cam-null", "cam-maybe", "unknown-path", "wrong-method"],
)  # fmt: skip
def test_framework_errors_answer_the_one_error_shape(
    client: TestClient, method: str, path: str, status: int, detail: str
) -> None:
    answer = getattr(client, method)(path)
    assert answer.status_code == status and answer.json() == {"detail": detail}
    if status == 405:
        assert answer.headers["allow"] == "POST"


def test_malformed_forms_are_400(client: TestClient) -> None:
    only_field = client.post(
        "/v1/predict",
        content=b'--B\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--B--\r\n',
        headers={"content-type": "multipart/form-data; boundary=B"},
    )
    assert only_field.status_code == 400 and "has no file part" in only_field.json()["detail"]
    unbounded = client.post("/v1/predict", content=b"x", headers={"content-type": "multipart/form-data"})
    assert unbounded.status_code == 400 and "without a boundary" in unbounded.json()["detail"]
    two = client.post("/v1/predict", files=[("f", ("a.png", gray_png(), "image/png"))] * 2)
    assert two.status_code == 400 and "/v1/predict/batch" in two.json()["detail"]


def test_full_queue_is_503_with_retry_after(models: dict[str, Path]) -> None:
    with serving(models["plain"], max_queue=1) as client:
        service = client.app.state.service
        gate = threading.Event()
        service.batcher.executor.submit(gate.wait, 30)  # the model is busy
        first: list[Any] = []
        sender = threading.Thread(target=lambda: first.append(post_png(client, gray_png())))
        sender.start()
        deadline = time.monotonic() + 10
        while service.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = post_png(client, gray_png())
        gate.set()
        sender.join(30)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert "limit is 1 (--max-queue)" in busy.json()["detail"]
    assert first[0].status_code == 200


def test_unexpected_failure_is_a_500_without_traceback(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving(models["plain"]) as client:

        def broken(jobs: list[Any]) -> list[Any]:
            raise RuntimeError("boom inside the model call")

        monkeypatch.setattr(client.app.state.service.batcher, "_run_batch", broken)
        answer = post_png(client, gray_png())
    assert answer.status_code == 500
    assert answer.json() == {"detail": "internal error (RuntimeError); the server log has the details"}


def test_nothing_is_written_to_disk_without_save_dir(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an upload was about to be written to a temporary file")

    noise = np.random.default_rng(0).integers(0, 256, (1100, 1100), np.uint8)  # > 1 MiB as PNG
    data = png_bytes(noise)
    assert len(data) > 1 << 20
    monkeypatch.chdir(tmp_path)
    with serving(models["plain"], max_bytes=4 << 20) as client:
        for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
            monkeypatch.setattr(tempfile, name, refuse)
        answer = client.post("/v1/predict", files={"file": ("big.png", data, "image/png")})
    assert answer.status_code == 200, answer.text
    assert list(tmp_path.iterdir()) == []


def test_save_dir_uses_server_chosen_names(models: dict[str, Path], tmp_path: Path) -> None:
    save_dir = tmp_path / "kept"
    data = gray_png(120)
    with serving(models["plain"], save_dir=save_dir) as client:
        answer = client.post("/v1/predict", files={"file": ("../../etc/evil.png", data, "image/png")})
    assert answer.status_code == 200
    (saved,) = save_dir.iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{32}\.png", saved.name) and saved.read_bytes() == data
    assert answer.json()["saved_as"] == saved.name and answer.json()["filename"] == "../../etc/evil.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


# --------------------------------------------------------------------------- token, metrics, bind address


def test_token_is_required_on_every_api_request(models: dict[str, Path]) -> None:
    with serving(models["plain"], token="s3cret") as client:
        for method, path in (("get", "/healthz"), ("get", "/metrics"), ("get", "/v1/model"),
                             ("get", "/openapi.json"), ("post", "/v1/predict")):  # fmt: skip
            answer = getattr(client, method)(path)
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in answer.json()["detail"]
        wrong = post_png(client, gray_png(), headers={"authorization": "Bearer guess"})
        right = post_png(client, gray_png(), headers={"authorization": "Bearer s3cret"})
        page = client.get("/")  # the static page holds no data; it asks for the token
        metrics = client.get("/metrics", headers={"authorization": "Bearer s3cret"}).text
    assert wrong.status_code == 401 and right.status_code == 200 and page.status_code == 200
    assert 'kidney_edge_requests_total{endpoint="/v1/predict",outcome="unauthorized"} 2' in metrics


def test_metrics_are_prometheus_text(models: dict[str, Path]) -> None:
    with serving(models["plain"]) as client:
        post_png(client, gray_png())
        client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"})
        answer = client.get("/metrics")
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = answer.text
    sha = hashlib.sha256(models["plain"].read_bytes()).hexdigest()
    assert f'sha256="{sha}"' in text and "# TYPE kidney_edge_request_duration_seconds histogram" in text
    assert 'kidney_edge_requests_total{endpoint="/v1/predict",outcome="ok"} 1' in text
    assert 'kidney_edge_requests_total{endpoint="/v1/predict",outcome="unsupported_type"} 1' in text
    assert 'kidney_edge_request_duration_seconds_count{endpoint="/v1/predict"} 2' in text
    assert 'kidney_edge_stage_duration_seconds_bucket{stage="inference",le="+Inf"} 1' in text
    for line in text.splitlines():  # every sample line: name{labels} value
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? [0-9.e+-]+", line), line


def test_bind_address_defaults_to_localhost_and_warns_elsewhere() -> None:
    assert ServeConfig().host == "127.0.0.1"
    with pytest.raises(InputError, match="--workers must be in 1..64"):
        ServeConfig(workers=0)  # the layout's own check, shared with predict
    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.20", "edge-box.local"))
    assert exposure_warning("127.0.0.1", None) is None
    assert "NO authentication" in exposure_warning("0.0.0.0", None)
    assert "need the bearer token" in exposure_warning("0.0.0.0", "s3cret")


def test_cli_serves_the_model_on_localhost_by_default(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    from kidney_edge.cli import app

    runs: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda served, **options: runs.append({"app": served, **options}))
    runner = CliRunner()
    default = runner.invoke(app, ["serve", "--model", str(models["plain"]), "--threads", "1"])
    assert default.exit_code == 0, default.output
    assert (runs[0]["host"], runs[0]["port"]) == ("127.0.0.1", 8000)
    assert "warning" not in default.output
    exposed = runner.invoke(
        app, ["serve", "--model", str(models["plain"]), "--host", "0.0.0.0", "--port", "9000"]
    )
    assert exposed.exit_code == 0 and (runs[1]["host"], runs[1]["port"]) == ("0.0.0.0", 9000)
    assert "NO authentication" in exposed.output and "--token" in exposed.output
    bad = runner.invoke(app, ["serve", "--model", str(models["plain"]), "--max-queue", "0"])
    assert bad.exit_code == 2 and "--max-queue must be in 1..100000, got 0" in bad.output
    missing = runner.invoke(app, ["serve", "--model", "missing.onnx"])
    assert missing.exit_code == 2 and "missing.onnx" in missing.output
    assert len(runs) == 2
    assert "Binds 127.0.0.1 by default" in runner.invoke(app, ["serve", "--help"]).output


# --------------------------------------------------------------------------- layers


def test_serving_imports_nothing_from_the_training_stack(models: dict[str, Path], tmp_path: Path) -> None:
    from test_import_graph import in_runtime_layer, run_refusing_heavy

    script = """
from fastapi.testclient import TestClient
from kidney_edge.runtime.serve import ServeConfig, create_app

with TestClient(create_app(ServeConfig(model=sys.argv[1], threads=1))) as client:
    status = client.post("/v1/predict?cam=true", content=open(sys.argv[2], "rb").read(),
                         headers={"content-type": "image/png"}).status_code
report(status=status)
"""
    image = tmp_path / "slice.png"
    image.write_bytes(gray_png())
    graph = run_refusing_heavy(script, str(models["cam"]), str(image), cwd=tmp_path)
    assert graph["status"] == 200, graph["output"]
    assert graph["attempts"] == [] and graph["loaded"] == []
    outside = [name for name in graph["ours"] if not in_runtime_layer(name)]
    assert outside == [] and "kidney_edge.runtime.serve.app" in graph["ours"]
