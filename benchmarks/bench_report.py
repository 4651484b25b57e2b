"""What `predict --report` costs: rows/s with and without the triage page, and the page's size.

    python benchmarks/bench_report.py --model EXPORT_DIR [--images FOLDER] [--rounds 3]
    python benchmarks/bench_report.py --render-only          # rewrite report.md from report.json

``--images`` (default: made once with ``kidney-edge synth --style lookalike --size 512 --n 2000``
under ``--work``) is classified by ``kidney-edge predict`` as a whole process
(``harness.run_cli``: start-up and, with ``--report``, the page written at the end included), at
one fixed ``--precision`` and batch 8, without and then with ``--report``; the order alternates
between rounds because the machine is shared, and the median round's ratio is the figure. Each
run also gets its steady rows/s (10%-90% of the rows on disk), which leaves out start-up and the
page: the per-row cost of keeping thumbnails and activation maps alone; and rows per CPU-second
(the process's user + system time), which other people's load on a shared machine moves far
less than wall time. The page's size, counts and cards are read from the last ``--report`` run.

Targets (issue 29): with --report >= 0.85x the rows/s without it; the page <= 15 MB.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path
from typing import Any

import _harness as harness

RESULTS = harness.RESULTS / "report"
N_IMAGES = 2000
BATCH_SIZE = 8
TARGET_RATIO = 0.85
TARGET_PAGE_MB = 15.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="export folder (or .onnx) with a cam output")
    parser.add_argument(
        "--images", type=Path, help=f"default: {N_IMAGES} lookalike phantoms made under --work"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-report"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--render-only", action="store_true")
    return parser.parse_args()


def phantom_slices(work: Path) -> Path:
    """``N_IMAGES`` look-alike phantom slices at 512 px, made once with ``kidney-edge synth``."""
    folder = work / f"lookalike-{N_IMAGES}-512"
    if not folder.is_dir():
        run = harness.run_cli(
            ["synth", folder, "--n", N_IMAGES, "--style", "lookalike", "--size", 512, "--seed", 0]
        )
        if run.exit_code != 0:
            raise SystemExit(f"synth failed: {run.output[-2000:]}")
    return folder


def predict(args: argparse.Namespace, images: Path, report: bool) -> tuple[harness.CliRun, dict[str, Any]]:
    out = args.work / ("with-report.csv" if report else "plain.csv")
    page = out.with_name(out.stem + ".report.html")
    page.unlink(missing_ok=True)
    command = ["predict", images, "--model", args.model, "--out", out, "--precision", args.precision,
               "--batch-size", BATCH_SIZE, *(["--report"] if report else [])]  # fmt: skip
    run = harness.run_cli(command, out=out)
    if run.exit_code not in (0, 3):
        raise SystemExit(f"predict failed ({run.exit_code}): {run.output[-2000:]}")
    result = {**run.to_dict(), "steady_images_per_s": run.steady_images_per_s()}
    return run, result | ({"page": page_facts(page)} if report else {})


def page_facts(page: Path) -> dict[str, Any]:
    """Size, counts and cards of a written page, read back from its HTML."""
    text = page.read_text(encoding="utf-8")
    counts = re.findall(
        r'<tr data-count-label="([^"]+)"><th scope=row>[^<]*</th><td class="count">(\d+)</td>', text
    )
    return {"bytes": page.stat().st_size, "mb": round(page.stat().st_size / 1e6, 2),
            "counts": {label: int(n) for label, n in counts}, "cards": text.count('<article class="card"'),
            "thumbnails": text.count("data:image/jpeg;base64,")}  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, Any]:
    images = args.images or phantom_slices(args.work)
    harness.warm_disk_cache(images)
    record = harness.start_record(model=str(args.model), images=str(images), precision=args.precision,
                                  batch_size=BATCH_SIZE, rounds=args.rounds)  # fmt: skip
    rounds = []
    for index in range(args.rounds):
        runs = {}
        for report in (False, True) if index % 2 == 0 else (True, False):
            harness.log(f"round {index + 1}: predict {'with' if report else 'without'} --report")
            runs["report" if report else "plain"] = predict(args, images, report)[1]
        plain, with_report = runs["plain"], runs["report"]
        steady = (with_report["steady_images_per_s"] or 0) / (plain["steady_images_per_s"] or 1)
        cpu = with_report["images_per_cpu_s"] / plain["images_per_cpu_s"]
        rounds.append({**runs, "ratio": round(with_report["images_per_s"] / plain["images_per_s"], 3),
                       "steady_ratio": round(steady, 3), "cpu_ratio": round(cpu, 3)})  # fmt: skip
    record["rounds"] = rounds
    record["median_ratio"] = statistics.median(r["ratio"] for r in rounds)
    record["median_steady_ratio"] = statistics.median(r["steady_ratio"] for r in rounds)
    record["median_cpu_ratio"] = statistics.median(r["cpu_ratio"] for r in rounds)
    record["page"] = rounds[-1]["report"]["page"]
    return harness.finish_record(record)


def render(record: dict[str, Any]) -> str:
    page, machine = record["page"], record["machine"]
    ok_ratio = "meets" if record["median_ratio"] >= TARGET_RATIO else "misses"
    ok_page = "meets" if page["mb"] <= TARGET_PAGE_MB else "misses"
    lines = [
        "# predict --report: cost and page size",
        "",
        f"Recorded by `{record['command']}` ({record['started_utc']}, commit {record['commit']}).",
        f"Machine: {harness.cpu_kind(machine)}; onnxruntime {machine['onnxruntime']}; load average "
        f"before {record['load_average_before']}, after {record['load_average_after']}.",
        "",
        f"Input: {sum(page['counts'].values())} look-alike phantom slices, 512 px JPEG (`{record['images']}`); "
        f"model `{record['model']}` at {record['precision']}, batch {record['batch_size']}; whole `predict` "
        "processes, the order alternating per round.",
        "",
        "| round | rows/s without | rows/s with --report | ratio | steady rows/s without | steady with | steady ratio | rows per CPU-s without | with | CPU ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for number, r in enumerate(record["rounds"], start=1):
        lines.append(
            f"| {number} | {r['plain']['images_per_s']} | {r['report']['images_per_s']} | {r['ratio']} | "
            f"{r['plain']['steady_images_per_s']} | {r['report']['steady_images_per_s']} | {r['steady_ratio']} | "
            f"{r['plain']['images_per_cpu_s']} | {r['report']['images_per_cpu_s']} | {r['cpu_ratio']} |"
        )
    counts = ", ".join(f"{label} {n}" for label, n in page["counts"].items())
    lines += [
        "",
        f"- Median ratio with/without `--report`: **{record['median_ratio']}** ({ok_ratio} the target "
        f"{TARGET_RATIO}); steady-state (10-90% of rows, no start-up, no page): {record['median_steady_ratio']}; "
        f"rows per CPU-second (user + system time of the process, which moves far less with the machine's "
        f"other load than wall time): {record['median_cpu_ratio']}.",
        f"- Page: **{page['mb']} MB** ({ok_page} the target {TARGET_PAGE_MB} MB), {page['cards']} cards, "
        f"{page['thumbnails']} thumbnails; counts {counts}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.render_only:
        harness.write_markdown(RESULTS, render(harness.read_results(RESULTS)))
        return
    if args.model is None:
        raise SystemExit("--model EXPORT_DIR is required (an export with a cam output)")
    args.work.mkdir(parents=True, exist_ok=True)
    record = measure(args)
    markdown = render(record)
    harness.write_results(RESULTS, record, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
