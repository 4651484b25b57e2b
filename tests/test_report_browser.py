"""The `predict --report` page in a real headless browser: Debian's chromium driven by Playwright.

A phantom run writes its page; the browser opens it from disk (file://, no server), and the
counts it shows must be the rows', the label filter must leave only Tumor cards, the controls
must be reachable from the keyboard, and nothing may be fetched. The browser is the system
chromium (``.ci/run`` installs it), never a downloaded one.
"""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:  # CI installs it (.ci/run) and stops if it cannot
    pytest.skip("no chromium on PATH (apt-get install chromium)", allow_module_level=True)

from test_report_page import threshold_model  # noqa: E402

from kidney_edge.runtime import PredictOptions, predict_folder  # noqa: E402
from kidney_edge.runtime.predict import scan_image_paths  # noqa: E402
from kidney_edge.runtime.report_page import ReportOptions  # noqa: E402
from kidney_edge.runtime.rows import report_path  # noqa: E402


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    from kidney_edge.phantoms.classic import synthesize

    root = tmp_path_factory.mktemp("report-browser")
    synthesize(root / "phantom", n=24, size=64, seed=2)
    (root / "phantom" / "notes.png").write_bytes(b"not a png")  # one unreadable file
    model = threshold_model(root, scan_image_paths(root / "phantom"), quantile=0.5)
    out = root / "predictions.csv"
    predict_folder(
        root / "phantom", PredictOptions(model=model, out=out, workers=1, threads=1, report=ReportOptions())
    )
    with open(out, newline="") as handle:
        return report_path(out), list(csv.DictReader(handle))


def test_the_page_opens_from_disk_counts_the_rows_and_filters_to_tumor(
    phantom_run: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    page_file, rows = phantom_run
    expected = Counter("error" if row["error"] else row["label"] for row in rows)
    assert expected["Tumor"] and expected["error"] == 1
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_file.resolve().as_uri())
            shown = page.eval_on_selector_all(
                "tr[data-count-label]",
                "rows => rows.map(r => [r.dataset.countLabel, +r.querySelector('.count').textContent])",
            )
            assert {label: count for label, count in shown if count} == dict(expected)
            assert int(page.inner_text("#total")) == len(rows)
            assert page.locator(".card img").first.evaluate("img => img.naturalWidth") == 128

            for _ in range(10):  # the label filter is reachable from the keyboard
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement.id") == "label-filter":
                    break
            assert page.evaluate("document.activeElement.id") == "label-filter"
            page.select_option("#label-filter", "Tumor")
            visible = page.locator(".card:visible")
            assert visible.count() == page.locator('.card[data-label="Tumor"]').count() == expected["Tumor"]
            assert set(visible.evaluate_all("cards => cards.map(c => c.dataset.label)")) == {"Tumor"}
            assert page.locator("#others tr[data-label]:visible").count() == 0  # Tumor rows are all cards

            page.select_option("#label-filter", "")
            page.keyboard.press("/")  # jumps to the path search
            page.keyboard.type("notes.png")
            assert page.locator("#errors tr[data-label]:visible").count() == 1
            assert page.locator(".card:visible").count() == 0
            screenshot = tmp_path / "report-page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert all(url.startswith(("file://", "data:")) for url in requests), requests
        finally:
            browser.close()
