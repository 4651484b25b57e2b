"""Trained runs scored on a hold-out of new patients drawn by the same renderer.

An 800-slice look-alike phantom's test split holds 6-7 Tumor and 3 Stone patients, so one
patient moves its macro-F1 by several points and levers a few points apart cannot be told
apart on it (benchmarks/results/recipe.md). A hold-out of 1,000 slices from a phantom seed no
training set uses holds about 230 new patients; every run of the same family is scored on the
same files, whatever its data seed, so two recipes' figures compare directly.

    python benchmarks/bench_holdout.py --workdir /work/data --runs /work/data/runs/RUN ...
    python benchmarks/bench_holdout.py --render-only       # rewrite holdout.md from holdout.json

The hold-out is ``kidney-edge synth DIR --style STYLE --n N --seed SEED`` (made once under
``--workdir``); each run's best.pt is scored with ``kidney-edge evaluate``'s library call on the
whole folder, argmax figures with 95% bootstrap CIs. Runs already recorded are kept (``--force``
rescores them); the record is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import _harness as harness

OUT = harness.RESULTS / "holdout"
RECALL_ORDER = ("Tumor", "Stone", "Cyst", "Normal")
PATIENT_DRAWS = 1000
FINETUNE_SHOWN = (
    "lr",
    "unfreeze_blocks",
    "layer_decay",
    "label_smoothing",
    "mixup_alpha",
    "ema_decay",
    "epochs",
)


def holdout_folder(workdir: Path, style: str, n_images: int, seed: int) -> Path:
    """The hold-out phantom (made if missing)."""
    from kidney_edge.phantoms.styles import synthesizer

    folder = workdir / f"holdout-{style}-s{seed}-n{n_images}"
    if not (folder / "phantom_truth.csv").is_file():
        synthesizer(style)(folder, n=n_images, seed=seed, size=512)
    return folder


def trained_with(run: Path) -> dict[str, Any]:
    """What a run folder was trained on and how (its config.json), as the table shows it."""
    config = json.loads((run / "config.json").read_text())
    train = config["train_config"]
    finetune = train["finetune"]
    return {
        "data": Path(train["data_dir"]).name,
        "n_train": sum(config["train_counts"].values()),
        "arch": train["arch"],
        "image_size": train["image_size"],
        "region": train.get("region", "whole"),
        "finetune": {key: finetune.get(key) for key in FINETUNE_SHOWN},
        "augmentation": train.get("augmentation"),
    }


def figures(metrics: dict[str, Any], block: str = "argmax") -> dict[str, Any]:
    """A metrics.json block's figures as the demo headlines them (CIs, recall per class):
    ``argmax``, or ``rule`` (the run's stored decision rule, the labels predict writes)."""
    from kidney_edge.demo import decision_figures

    return decision_figures(metrics[block], metrics["positive_class"])


def patient_of(holdout: Path) -> dict[str, str]:
    """The hold-out's patient of each slice (path relative to the folder), from its truth file."""
    import csv

    with open(holdout / "phantom_truth.csv", newline="") as handle:
        return {row["path"]: row["patient"] for row in csv.DictReader(handle)}


def patient_interval(predictions: Path, holdout: Path) -> list[float] | None:
    """95% interval of argmax macro-F1 drawing the hold-out's patients, not its slices, with
    replacement (``metrics.bootstrap_ci`` with groups): a patient's slices are alike."""
    import csv

    import numpy as np

    from kidney_edge.metrics import bootstrap_ci

    patients_by_path = patient_of(holdout)
    with open(predictions, newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = tuple(sorted({row["true_label"] for row in rows} | {row["argmax_label"] for row in rows}))
    truth = np.array([names.index(row["true_label"]) for row in rows])
    called = np.array([names.index(row["argmax_label"]) for row in rows])
    patients = np.array([patients_by_path[str(Path(row["path"]).relative_to(holdout))] for row in rows])
    return bootstrap_ci(truth, called, names, n_bootstrap=PATIENT_DRAWS, groups=patients)["macro_f1"]


def score(run: Path, holdout: Path, eval_dir: Path) -> dict[str, Any]:
    from kidney_edge.evaluation import evaluate

    load_before, started = harness.load_average(), time.perf_counter()
    result = evaluate(run / "best.pt", holdout, out_dir=eval_dir / run.name)
    seconds = time.perf_counter() - started
    test = json.loads((run / "metrics.json").read_text())
    return {
        "run": run.name,
        **trained_with(run),
        "test": figures(test),
        "holdout": figures(result.metrics),
        "holdout_rule": figures(result.metrics, "rule"),
        "holdout_patient_ci": patient_interval(result.out_dir / "predictions.csv", holdout),
        "n_holdout": result.n_images,
        "seconds": round(seconds, 1),
        "load_before": load_before,
        "load_after": harness.load_average(),
    }


def recipe_of(row: dict[str, Any]) -> str:
    """The bench_recipe.py recipe of a run folder named ``{data}-s{seed}-{recipe}-{size}``."""
    match = re.fullmatch(r".*?-s\d+-(.+)-\d+", row["run"])
    return match.group(1) if match else row["run"]


def _interval(ci: list[float] | None) -> str:
    return "[-]" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _ci(value: float, ci: list[float]) -> str:
    return f"{value:.3f} {_interval(ci)}"


def _rule_cell(rule: dict[str, Any] | None) -> str:
    return "-" if rule is None else f"{rule['macro_f1']:.3f} / {rule['tumor_recall']:.3f}"


def render(record: dict[str, Any]) -> str:
    holdout = record["holdout"]
    lines = [
        "# Trained runs on a hold-out of new patients",
        "",
        f"Recorded by `benchmarks/bench_holdout.py` (`{record['command']}`, commit {record['commit']}), "
        f"{record['started_utc']} to {record.get('finished_utc', '(unfinished)')}.",
        f"Machine: {harness.cpu_kind(record['machine'])}; scoring time does not enter any figure here.",
        "",
        f"Hold-out: `kidney-edge synth {holdout['folder']} --style {holdout['style']} "
        f"--n {holdout['n_images']} "
        f"--seed {holdout['seed']}` ({holdout['n_patients']} patients; a phantom seed no training set "
        "uses), every file scored by each run's best.pt under argmax, 95% bootstrap CIs over slices and, "
        "for macro-F1, over patients (a patient's slices drawn together); the last column under the "
        "run's stored decision rule (Tumor when p(Tumor) reaches the threshold chosen on validation "
        "for Tumor recall 0.98), the labels `predict` writes. "
        "Test: the run's own test split (its metrics.json), for comparison.",
        "",
        "| recipe | trained on (slices) | test macro-F1 [CI] | hold-out macro-F1 [CI] [patient CI] "
        "| hold-out Tumor recall [CI] "
        "| hold-out recall Tumor / Stone / Cyst / Normal | hold-out accuracy "
        "| hold-out under the stored rule: macro-F1 / Tumor recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(record["runs"], key=lambda r: (recipe_of(r), r["n_train"], r["data"])):
        test, held = row["test"], row["holdout"]
        recall = " / ".join(f"{held['recall'][name]:.2f}" for name in RECALL_ORDER if name in held["recall"])
        lines.append(
            f"| {recipe_of(row)} | {row['data']} ({row['n_train']}) "
            f"| {_ci(test['macro_f1'], test['macro_f1_ci'])} "
            f"| {_ci(held['macro_f1'], held['macro_f1_ci'])} {_interval(row.get('holdout_patient_ci'))} "
            f"| {_ci(held['tumor_recall'], held['tumor_recall_ci'])} "
            f"| {recall} | {held['accuracy']:.3f} | {_rule_cell(row.get('holdout_rule'))} |"
        )
    lines += ["", *record.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument(
        "--runs", nargs="*", type=Path, default=[], help="Run folders (best.pt, config.json)."
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("bench-data"), help="Where the hold-out is made."
    )
    parser.add_argument("--style", default="lookalike")
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--force", action="store_true", help="Rescore runs already recorded.")
    parser.add_argument("--out", type=Path, default=OUT, help="OUT.json and OUT.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite OUT.md from OUT.json")
    args = parser.parse_args(argv)
    out = args.out
    record = harness.read_results(out)
    if args.render_only:
        harness.write_markdown(out, render(record))
        return 0
    folder = holdout_folder(args.workdir, args.style, args.n_images, args.seed)
    wanted = {"folder": folder.name, "style": args.style, "n_images": args.n_images, "seed": args.seed}
    if record is None or {k: record["holdout"].get(k) for k in wanted} != wanted:
        record = harness.start_record(
            holdout={**wanted, "n_patients": len(set(patient_of(folder).values()))}, runs=[], notes=[]
        )
    for row in record["runs"]:  # rows scored before the patient interval and the rule's figures
        scored = args.workdir / "holdout-eval" / row["run"]
        if "holdout_patient_ci" not in row and (scored / "predictions.csv").is_file():
            row["holdout_patient_ci"] = patient_interval(scored / "predictions.csv", folder)
        if "holdout_rule" not in row and (scored / "metrics.json").is_file():
            row["holdout_rule"] = figures(json.loads((scored / "metrics.json").read_text()), "rule")
    for run in args.runs:
        if not args.force and any(row["run"] == run.name for row in record["runs"]):
            continue
        harness.log(f"scoring {run.name}")
        record["runs"] = [row for row in record["runs"] if row["run"] != run.name]
        record["runs"].append(score(run, folder, args.workdir / "holdout-eval"))
        harness.write_results(out, harness.finish_record(record), render(record))
    harness.write_results(out, harness.finish_record(record), render(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
