"""Demo wall time per stage, and its headline figures, on this machine.

    python benchmarks/bench_demo.py                         # runs `kidney-edge demo` (about 10 min)
    python benchmarks/bench_demo.py --summary runs/demo/demo_summary.json --total-s 512
                                                            # records an existing run

Writes benchmarks/results/demo.md and demo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kidney_edge.demo import targets_met_under_rule  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_demo(out: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "kidney_edge", "demo", "--out", str(out), "--overwrite"], check=True
    )
    return time.perf_counter() - started


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def pct_ci(ci: list[float] | None) -> str:
    return "-" if not ci else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%"


def render(summary: dict, total_s: float | None, load: list[float]) -> str:
    stages = summary["stages"]
    head = summary["headline"]
    lines = [
        "# Demo: wall time per stage and headline figures",
        "",
        "Recorded by `benchmarks/bench_demo.py` on "
        f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"load average at the end {load}.",
        "",
        "| " + " | ".join([*stages, "sum of stages", "whole process"]) + " |",
        "| " + " | ".join(["---:"] * (len(stages) + 2)) + " |",
        "| "
        + " | ".join(
            [
                *(f"{s:.0f} s" for s in stages.values()),
                f"{sum(stages.values()):.0f} s",
                "-" if total_s is None else f"{total_s:.0f} s",
            ]
        )
        + " |",
        "",
        f"Test split: {head.get('n_test')} slices of held-out phantom patients.",
        "",
        "| figure | value | 95% CI |",
        "| --- | ---: | --- |",
    ]
    for name, recall in head["recall"].items():
        ci = head["recall_ci"].get(name)
        lines.append(f"| recall {name} | {pct(recall)} | {pct_ci(ci)} |")
    lines += [
        f"| macro-F1 | {pct(head['macro_f1'])} | {pct_ci(head.get('macro_f1_ci'))} |",
        f"| accuracy | {pct(head['accuracy'])} | {pct_ci(head.get('accuracy_ci'))} |",
    ]
    rule = head.get("under_rule") or {}
    if rule:
        lines.append(
            f"| under the tumor operating point ({rule['rule'].get('threshold', 0):.3f}): Tumor recall / "
            f"macro-F1 / accuracy | {pct(rule.get('tumor_recall'))} / {pct(rule.get('macro_f1'))} / "
            f"{pct(rule.get('accuracy'))} | |"
        )
    phases = summary.get("phase_val_macro_f1") or {}
    lines += [
        "",
        "Best validation macro-F1 per phase: "
        + (", ".join(f"{name} {value:.3f}" for name, value in phases.items()) or "-"),
        "",
        f"Targets (>= 97%) under argmax: {summary.get('targets_met')}; under the tumor operating point "
        f"(the rule the exported model applies): {targets_met_under_rule(head)}",
        "",
        f"Parity: max |dp| {summary['parity'].get('max_abs_diff')}, argmax agreement "
        f"{summary['parity'].get('argmax_agreement')}; INT8 gate passed: "
        f"{(summary['parity'].get('int8') or {}).get('passed')}.",
        f"Held-out patients: {summary.get('holdout')}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--summary", type=Path, help="demo_summary.json of a run to record instead of running"
    )
    parser.add_argument("--total-s", type=float, help="whole-process wall time of that run, if measured")
    args = parser.parse_args()
    total_s = args.total_s
    if args.summary is None:
        out = Path(tempfile.mkdtemp(prefix="kidney-edge-demo-"))
        total_s = run_demo(out)
        args.summary = out / "demo_summary.json"
    summary = json.loads(args.summary.read_text())
    load = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    record = {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_average_end": load, "whole_process_s": total_s,
              "summary": summary}  # fmt: skip
    (RESULTS / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "demo.md").write_text(render(summary, total_s, load))
    print((RESULTS / "demo.md").read_text())


if __name__ == "__main__":
    main()
