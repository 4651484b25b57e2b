"""The web page end to end in a real headless browser: Debian's chromium driven by Playwright.

A uvicorn server runs in a thread on 127.0.0.1; the page gets a phantom slice through its file
input, and the label and probabilities it shows must be the ones ``predict`` computes for that
file. The browser is the system chromium (``.ci/run`` installs it), never a downloaded one.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:  # CI installs it (.ci/run) and stops if it cannot
    pytest.skip("no chromium on PATH (apt-get install chromium)", allow_module_level=True)

import uvicorn  # noqa: E402
from _factories import SIZE, make_cam_onnx  # noqa: E402

from kidney_edge.imaging import load_image  # noqa: E402
from kidney_edge.runtime import OnnxClassifier, classify_paths  # noqa: E402
from kidney_edge.runtime.serve import ServeConfig, create_app  # noqa: E402
from kidney_edge.spec import ModelSpec, RegionRule  # noqa: E402


@pytest.fixture(scope="module")
def phantom_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kidney_edge.phantoms.classic import synthesize

    out = tmp_path_factory.mktemp("browser") / "phantom"
    synthesize(out, n=4, size=128, seed=3, class_mix={"Tumor": 1.0})
    return sorted((out / "Tumor").glob("*.jpg"))[0]


@pytest.fixture(scope="module", params=[RegionRule.WHOLE, RegionRule.KIDNEYS], ids=lambda rule: rule.value)
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    spec = ModelSpec(input_size=SIZE, region=request.param)
    model = make_cam_onnx(tmp_path_factory.mktemp("browser-model") / "model.onnx", spec)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket over
    port = listener.getsockname()[1]
    app = create_app(ServeConfig(model=model, threads=1, workers=1, port=port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start within 30 s"
    yield f"http://127.0.0.1:{port}", model
    server.should_exit = True
    thread.join(10)
    listener.close()


def test_page_classifies_a_phantom_slice(
    server: tuple[str, Path], phantom_slice: Path, tmp_path: Path
) -> None:
    url, model = server
    (row,) = classify_paths([str(phantom_slice)], OnnxClassifier(model, threads=1))
    classes = OnnxClassifier(model, threads=1).class_names
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url + "/")
            sync_api.expect(page.locator("#card")).to_contain_text("Cyst, Normal, Stone, Tumor")
            region = OnnxClassifier(model, threads=1).spec.region
            sync_api.expect(page.locator("#card")).to_contain_text(region.description)
            assert "Not a medical device" in page.inner_text(".banner")
            for _ in range(10):  # the file chooser is reachable from the keyboard
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement.id") == "file":
                    break
            assert page.evaluate("document.activeElement.id") == "file"

            page.set_input_files("#file", str(phantom_slice))
            sync_api.expect(page.locator("#result")).to_be_visible(timeout=30_000)
            assert page.inner_text("#label") == row["label"]
            for name in classes:
                shown = page.inner_text(f'#probs li[data-class="{name}"] .pct')
                assert shown == f"{100 * row[f'p_{name}']:.1f}%", name
            assert page.locator("#rule").inner_text().startswith("Decision rule: argmax")
            sync_api.expect(page.locator("#cam-fig")).to_be_visible()
            assert page.evaluate("document.getElementById('cam').naturalWidth") == model_input_size(model)
            if OnnxClassifier(model, threads=1).spec.region is RegionRule.WHOLE:  # the view is the slice
                sync_api.expect(page.locator("#slice-fig")).to_be_hidden()
            else:  # the map drawn back onto the whole uploaded slice, as decoded for the model
                sync_api.expect(page.locator("#slice-fig")).to_be_visible()
                decoded = load_image(phantom_slice, OnnxClassifier(model, threads=1).spec)
                assert page.evaluate("document.getElementById('slice-cam').naturalWidth") == decoded.width
            screenshot = tmp_path / "serve-page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing scrolls sideways
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        finally:
            browser.close()


def model_input_size(model: Path) -> int:
    return OnnxClassifier(model, threads=1).input_size
