"""The screenshot in docs/report-page.md of a `predict --report` page, opened the way the browser test opens it.

    python benchmarks/report_screenshot.py --page predictions.report.html \\
        --out benchmarks/results/report_page.png [--label Tumor]

Opens ``--page`` from disk (file://, nothing else is fetched) in Debian's chromium (Playwright,
headless), optionally filters it to ``--label``, and saves a screenshot of the top of the page
(``--height`` px; the summary and the first flagged cards), or of one element (``--section
series``: the DICOM series strips). Prints the counts the page shows.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--page", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "report_page.png")
    parser.add_argument("--label", default="", help="filter the page to this label first")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1400)
    parser.add_argument("--section", default="", help="shoot only this element id (e.g. series)")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(args.page.resolve().as_uri())
        if args.label:
            page.select_option("#label-filter", args.label)
        counts = page.eval_on_selector_all(
            "tr[data-count-label]",
            "rows => rows.map(r => r.dataset.countLabel + ' ' + r.querySelector('.count').textContent)",
        )
        print("counts:", ", ".join(counts), "|", page.inner_text("#shown"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shot = page.locator(f"#{args.section}") if args.section else page
        shot.screenshot(path=str(args.out))
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
