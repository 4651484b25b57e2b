"""Demo wall time per stage, and its headline figures, on this machine.

    python benchmarks/bench_demo.py                         # runs `kidney-edge demo` (about 10 min)
    python benchmarks/bench_demo.py --summary runs/demo/demo_summary.json --total-s 512
                                                            # records an existing run
    python benchmarks/bench_demo.py --render-only           # rewrite demo.md from demo.json
    python benchmarks/bench_demo.py --render-only --note "…" # add a reading of the figures

Writes benchmarks/results/demo.md and demo.json (the ``--note`` paragraphs are kept in the JSON).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import _harness as harness

RESULTS = harness.RESULTS / "demo"


def run_demo(out: Path) -> float:
    """`kidney-edge demo` as a whole process (:func:`harness.run_cli`); its wall seconds."""
    run = harness.run_cli(["demo", "--out", out, "--overwrite"])
    if run.exit_code != 0:
        raise SystemExit(f"kidney-edge demo failed ({run.exit_code}):\n{run.output[-4000:]}")
    return run.wall_s


def _machine_words(record: dict[str, Any]) -> str:
    """CPU, CPUs and Python of the record (older records kept ``cpu`` and ``cpus`` only)."""
    machine = record.get("machine")
    if machine is None:
        return f"{record['cpu']}, {record['cpus']} CPUs, Python unrecorded"
    return f"{machine['cpu_model']}, {machine['cores_host']} CPUs, Python {machine['python']}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def pct_ci(ci: list[float] | None) -> str:
    return "-" if not ci else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%"


def render(record: dict[str, Any]) -> str:
    summary, total_s = record["summary"], record["whole_process_s"]
    stages = summary["stages"]
    head, hold = summary["headline"], summary["holdout"]
    lines = [
        "# Demo: wall time per stage and headline figures",
        "",
        "Recorded by `benchmarks/bench_demo.py` on "
        f"{_machine_words(record)}; load average at the end {harness.recorded_load(record, 'after')}.",
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
        f"(`kidney_edge.phantoms.foreign`, {(summary.get('foreign') or {}).get('images', '-')} files): "
        f"{(summary.get('foreign') or {}).get('labels', '-')}, unreadable "
        f"{(summary.get('foreign') or {}).get('failed', '-')}.",
        "",
        "Training warnings: " + ("; ".join(summary.get("warnings") or []) or "none"),
    ]
    for note in record.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--summary", type=Path, help="demo_summary.json of a run to record instead of running"
    )
    parser.add_argument("--total-s", type=float, help="whole-process wall time of that run, if measured")
    parser.add_argument("--note", action="append", default=[], help="a paragraph added under the tables")
    parser.add_argument("--render-only", action="store_true", help="rewrite demo.md from demo.json")
    args = parser.parse_args()
    if args.render_only:
        record = harness.read_results(RESULTS)
        if args.note:  # a reading of the recorded figures, added after the run
            record["notes"] = [*record.get("notes", []), *args.note]
            harness.write_results(RESULTS, record, render(record))
        else:
            harness.write_markdown(RESULTS, render(record))
        return
    record = harness.start_record(notes=args.note, whole_process_s=args.total_s)
    if args.summary is None:
        out = Path(tempfile.mkdtemp(prefix="kidney-edge-demo-"))
        record["whole_process_s"] = run_demo(out)
        args.summary = out / "demo_summary.json"
    record["summary"] = json.loads(args.summary.read_text())
    harness.finish_record(record)
    harness.write_results(RESULTS, record, render(record))
    print(render(record))


if __name__ == "__main__":
    main()
