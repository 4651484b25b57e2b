"""The screenshot in docs/serve.md of the `kidney-edge serve` page, taken the way the browser test drives it.

    python benchmarks/serve_screenshot.py --model EXPORT_DIR_OR_ONNX --image SLICE \\
        --out benchmarks/results/serve_page.png

Serves ``--model`` on a free 127.0.0.1 port, opens the page in Debian's chromium (Playwright,
headless), chooses ``--image`` in the file input, waits for the result and saves a full-page
screenshot. Prints the label and probabilities the page shows.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kidney_edge.runtime.serve import ServeConfig, create_app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_page.png")
    parser.add_argument("--width", type=int, default=1200)
    args = parser.parse_args()

    import uvicorn
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(ServeConfig(model=args.model, port=port)), log_level="warning")
    )
    threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#card dd").first).not_to_have_text("loading…")
            page.set_input_files("#file", str(args.image))
            expect(page.locator("#result")).to_be_visible(timeout=60_000)
            print("label:", page.inner_text("#label"))
            print("probabilities:", page.inner_text("#probs").replace("\n", " "))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
