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


def cpu_model() -> str:
    from kidney_edge.runtime import cpu_info

    return cpu_info().model


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


def render(summary: dict, total_s: float | None, load: list[float], notes: list[str]) -> str:
    stages = summary["stages"]
    head, hold = summary["headline"], summary["holdout"]
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
        f"Decision rule stored in the model: {head['decision_rule']['description']}.",
        "",
        f"| figure | test split ({head.get('n_test')} slices), argmax | test, rule "
        f"| hold-out ({hold.get('n')} slices of new patients), argmax | hold-out, rule |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, name in (("tumor_recall", "Tumor recall"), ("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        cells = [f"{pct(block[d][key])} ({pct_ci(block[d].get(f'{key}_ci'))})"
                 for block in (head, hold) for d in ("argmax", "rule")]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in head["argmax"]["recall"]:
        cells = [pct(block[d]["recall"].get(name)) for block in (head, hold) for d in ("argmax", "rule")]
        lines.append(f"| recall {name} | " + " | ".join(cells) + " |")
    phases = summary.get("phase_val_macro_f1") or {}
    lines += [
        "",
        "Best validation macro-F1 per phase: "
        + (", ".join(f"{name} {value:.3f}" for name, value in phases.items()) or "-"),
        "",
        f"Targets (>= 97%) on the hold-out: under argmax {hold['targets_met']['argmax']}; under the rule "
        f"{hold['targets_met']['rule']}. On the test split: argmax {summary.get('targets_met')}, rule "
        f"{summary.get('targets_met_under_rule')}.",
        "",
        f"Parity: max |dp| {summary['parity'].get('max_abs_diff')}, argmax agreement "
        f"{summary['parity'].get('argmax_agreement')}; INT8 gate passed: "
        f"{(summary['parity'].get('int8') or {}).get('passed')}. Hold-out predicted with "
        f"{hold.get('model')} at {hold.get('images_per_s')} images/s end to end.",
        "",
        f"Out-of-distribution detector: {(summary['parity'].get('ood') or {}).get('description', 'none')}. "
        f"Hold-out slices labelled unknown: {hold.get('unknown', '-')} of {hold.get('n')}. Foreign corpus "
        f"(`kidney_edge.foreign`, {(summary.get('foreign') or {}).get('images', '-')} files): "
        f"{(summary.get('foreign') or {}).get('labels', '-')}, unreadable "
        f"{(summary.get('foreign') or {}).get('failed', '-')}.",
        "",
        "Training warnings: " + ("; ".join(summary.get("warnings") or []) or "none"),
    ]
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--summary", type=Path, help="demo_summary.json of a run to record instead of running"
    )
    parser.add_argument("--total-s", type=float, help="whole-process wall time of that run, if measured")
    parser.add_argument("--note", action="append", default=[], help="a paragraph added under the tables")
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
    (RESULTS / "demo.md").write_text(render(summary, total_s, load, args.note))
    print((RESULTS / "demo.md").read_text())


if __name__ == "__main__":
    main()
