"""Out-of-distribution detectors compared on a trained run: in-distribution rejection vs foreign inputs.

    python benchmarks/bench_ood.py --run RUN --holdout HOLDOUT_FOLDER [--work /tmp/ood-bench]

Exports RUN (fp32 + INT8, the export's own detector fitting included), then, for each model
file and each method of ``kidney_edge.ood.OodMethod``: fits the detector on the run's train
split features (that file's own features), chooses its threshold on the val split, and
measures the rejection rate on HOLDOUT (in-distribution images never used in training, with a
95% Wilson interval) and on the project's foreign corpus (``kidney_edge.foreign``), per kind,
with the AUROC of hold-out vs foreign scores (scikit-learn). Then ``kidney-edge predict`` runs
end to end on a mixed folder (hold-out + foreign) with the exported files, and on HOLDOUT with
and without ``--no-ood`` (alternating, whole process) for the detector's cost in throughput.
Writes OUT.json and OUT.md with the machine line and load.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path
from typing import Any

import _harness as harness
import numpy as np

REQUIRED_KINDS_EXCLUDED = ("other_ct",)  # real CT of other anatomy: reported apart (see foreign.py)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="trained run folder (best.pt + splits.csv)")
    parser.add_argument("--holdout", type=Path, help="in-distribution images never trained on")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ood-bench"))
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "ood")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating predict runs with and without OOD"
    )
    parser.add_argument(
        "--near",
        type=Path,
        help="near-distribution kidney CT slices in class folders (e.g. another renderer)",
    )
    parser.add_argument("--render-only", action="store_true", help="rewrite OUT.md from OUT.json")
    args = parser.parse_args()
    if not args.render_only and (args.run is None or args.holdout is None):
        parser.error("--run and --holdout are required (unless --render-only)")
    return args


def outputs_of(classifier: Any, paths: list[Path]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Graph outputs by name of the files the pipeline can read, and their indices into ``paths``."""
    from kidney_edge.errors import ImageReadError
    from kidney_edge.imaging import preprocess

    inputs, readable = [], []
    for index, path in enumerate(paths):
        try:
            inputs.append(preprocess(path, classifier.spec))
            readable.append(index)
        except ImageReadError as exc:
            harness.log(f"unreadable (an error row in predict, not a prediction): {path}: {exc.reason}")
    batches = [
        classifier.infer(np.stack(inputs[start : start + 32]), features=True, block_stats=True)
        for start in range(0, len(inputs), 32)
    ]
    outputs = {
        name: np.concatenate([getattr(batch, name) for batch in batches])
        for name in ("logits", "features", "block_stats")
    }
    return outputs, readable


def wilson(k: int, n: int) -> list[float]:
    from scipy.stats import binomtest

    interval = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return [interval.low, interval.high]


def compare_methods(
    model_path: Path, run: Path, holdout: list[Path], foreign: list[dict[str, Any]]
) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from kidney_edge.evaluation import class_indices, load_labelled
    from kidney_edge.ood import OodMethod, fit_detector
    from kidney_edge.runtime import OnnxClassifier

    classifier = OnnxClassifier(model_path, ood=False)
    names = classifier.spec.class_names
    train = load_labelled(run / "splits.csv", "train", class_names=names)
    val = load_labelled(run / "splits.csv", "val", class_names=names)
    harness.log(
        f"{model_path.name}: features of {len(train.paths)} train, {len(val.paths)} val, {len(holdout)} hold-out"
    )
    train_outputs, _ = outputs_of(classifier, train.paths)
    val_outputs, _ = outputs_of(classifier, val.paths)
    hold_outputs, _ = outputs_of(classifier, holdout)
    foreign_outputs, readable = outputs_of(classifier, [Path(r["path"]) for r in foreign])
    foreign_logits = foreign_outputs["logits"]
    kinds = np.array([foreign[i]["kind"] for i in readable])
    required = ~np.isin(kinds, REQUIRED_KINDS_EXCLUDED)
    results: dict[str, Any] = {
        "n_train": len(train.paths), "n_val": len(val.paths), "n_holdout": len(holdout),
        "n_foreign": len(foreign), "n_foreign_readable": len(readable), "methods": {},
        "foreign_argmax_labels": dict(zip(*np.unique(np.array(names)[foreign_logits.argmax(1)], return_counts=True), strict=True)),
    }  # fmt: skip
    results["foreign_argmax_labels"] = {str(k): int(v) for k, v in results["foreign_argmax_labels"].items()}
    y_train = class_indices(train.labels, names)
    for method in OodMethod:
        started = time.perf_counter()
        detector = fit_detector(method, (train_outputs, y_train), val_outputs, len(names))
        fit_s = time.perf_counter() - started
        hold_scores = detector.score(hold_outputs)
        foreign_scores = detector.score(foreign_outputs)
        hold_rejected = int(detector.rejects(hold_scores).sum())
        foreign_rejected = detector.rejects(foreign_scores)
        per_kind = {
            kind: {"n": int((kinds == kind).sum()), "rejected": int(foreign_rejected[kinds == kind].sum())}
            for kind in sorted(set(kinds))
        }
        scores = np.concatenate([hold_scores, foreign_scores[required]])
        is_foreign = np.concatenate([np.zeros(len(hold_scores)), np.ones(int(required.sum()))])
        results["methods"][method.value] = {
            "detector": detector.record(),
            "fit_s": round(fit_s, 2),
            "holdout_rejection": hold_rejected / len(hold_scores),
            "holdout_rejection_ci95": wilson(hold_rejected, len(hold_scores)),
            "foreign_rejection": float(foreign_rejected[required].mean()),
            "foreign_rejected": int(foreign_rejected[required].sum()),
            "foreign_n": int(required.sum()),
            "per_kind": per_kind,
            "auroc_holdout_vs_foreign": float(roc_auc_score(is_foreign, scores)),
        }
        harness.log(
            f"  {method.value}: hold-out {hold_rejected / len(hold_scores):.1%}, foreign {foreign_rejected[required].mean():.1%}"
        )
    return results


def predict_cli(folder: Path, model: Path, out: Path, *extra: str) -> tuple[dict[str, int], float]:
    """`kidney-edge predict` as a whole process (:func:`harness.run_cli`): label counts by the
    first folder under FOLDER (mixed: holdout/, foreign/) and label, and wall seconds."""
    run = harness.run_cli(["predict", folder, "--model", model, "--out", out, *extra], out=out)
    if run.exit_code not in (0, 3):
        raise SystemExit(f"predict failed ({run.exit_code}): {run.output[-2000:]}")
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    counts: dict[str, int] = {}
    for row in rows:
        parts = Path(row["path"]).relative_to(folder.resolve()).parts
        key = f"{parts[0] if len(parts) > 1 else ''}:{'error' if row['error'] else row['label']}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items())), run.wall_s


def near_distribution(models: dict[str, Path], near_dir: Path, work: Path) -> dict[str, Any]:
    """`kidney-edge predict` on kidney CT slices the model never saw the like of: how many each
    exported file calls unknown, and how often the argmax of the others names their folder's class."""
    record: dict[str, Any] = {"folder": str(near_dir)}
    for precision, model in models.items():
        out = work / f"near_{precision}.csv"
        predict_cli(near_dir, model, out)
        with open(out, newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if not row["error"]]
        rejected = sum(row["label"] == "unknown" for row in rows)
        accepted = [row for row in rows if row["label"] != "unknown"]
        right = sum(row["argmax_label"] == Path(row["path"]).parent.name for row in accepted)
        all_right = sum(row["argmax_label"] == Path(row["path"]).parent.name for row in rows)
        record[precision] = {
            "images": len(rows),
            "unknown": rejected,
            "unknown_rate_ci95": wilson(rejected, len(rows)),
            "accepted_argmax_right": right,
            "accepted": len(accepted),
            "all_argmax_right": all_right,
        }
        harness.log(f"near distribution, {precision}: {record[precision]}")
    return record


def end_to_end(
    models: dict[str, Path], holdout_dir: Path, foreign_dir: Path, work: Path, repeats: int
) -> dict[str, Any]:
    mixed = work / "mixed"
    shutil.rmtree(mixed, ignore_errors=True)
    shutil.copytree(foreign_dir, mixed / "foreign", ignore=shutil.ignore_patterns("*.csv"))
    from kidney_edge.runtime import scan_images

    for path in scan_images(holdout_dir)[::10]:  # every class of the hold-out
        target = mixed / "holdout" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    record: dict[str, Any] = {"mixed_folder": {"holdout_images": len(scan_images(holdout_dir)[::10])}}
    for precision, model in models.items():
        counts, _ = predict_cli(mixed, model, work / f"mixed_{precision}.csv")
        record["mixed_folder"][precision] = counts
        harness.log(f"mixed folder, {precision}: {counts}")
    timing: dict[str, list[float]] = {"ood": [], "no_ood": []}
    for _ in range(repeats):  # alternate so that load from other jobs hits both alike
        for key, extra in (("ood", ()), ("no_ood", ("--no-ood",))):
            _, seconds = predict_cli(holdout_dir, models["fp32"], work / f"holdout_{key}.csv", *extra)
            timing[key].append(seconds)
    record["throughput"] = throughput_summary(timing, len(scan_images(holdout_dir)))
    return record


def throughput_summary(seconds: dict[str, list[float]], images: int) -> dict[str, Any]:
    """Median whole-process images/s with and without the detector, and their ratio (on / off).

    Medians, not bests: on a shared machine a single quiet run decides a best."""
    median = {key: float(np.median(values)) for key, values in seconds.items()}
    return {
        "images": images,
        "model": "fp32",
        "seconds": seconds,
        "images_per_s_median": {key: images / s for key, s in median.items()},
        "ood_on_over_off": median["no_ood"] / median["ood"],
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        '# Out-of-distribution ("unknown") detectors',
        "",
        f"Measured {harness.recorded(result, 'started_utc')} with `{result['command']}`.",
        f"Machine: {result['machine']['cpu_model']}, {result['machine']['cores_usable']} usable cores, "
        f"load average before {harness.recorded_load(result, 'before')}, after {harness.recorded_load(result, 'after')}.",
        "",
        "Each detector is fitted on the run's train split features of that model file, its threshold "
        "set on the val split so that the 95% upper bound of val rejection is at most 5%. "
        "Hold-out: in-distribution images never used in training. Foreign: the project's own corpus "
        "(`kidney_edge.foreign`), without `other_ct`, which is reported per kind.",
        "",
    ]
    for precision, block in result["models"].items():
        lines += [
            f"## {precision} ({block['n_train']} train, {block['n_val']} val, {block['n_holdout']} hold-out, "
            f"{block['n_foreign_readable']} of {block['n_foreign']} foreign files readable)",
            "",
            "| method | val rejection | hold-out rejection [95% CI] | foreign rejected | AUROC hold-out vs foreign |",
            "| --- | --- | --- | --- | --- |",
        ]
        for method, m in block["methods"].items():
            low, high = m["holdout_rejection_ci95"]
            lines.append(
                f"| {method} | {m['detector']['val_rejection']:.1%} | {m['holdout_rejection']:.1%} "
                f"[{low:.1%}, {high:.1%}] | {m['foreign_rejected']}/{m['foreign_n']} = "
                f"{m['foreign_rejection']:.1%} | {m['auroc_holdout_vs_foreign']:.3f} |"
            )
        kinds = sorted(next(iter(block["methods"].values()))["per_kind"])
        lines += ["", "Foreign rejected per kind:", "", "| method | " + " | ".join(kinds) + " |",
                  "| --- |" + " --- |" * len(kinds)]  # fmt: skip
        for method, m in block["methods"].items():
            cells = [f"{m['per_kind'][k]['rejected']}/{m['per_kind'][k]['n']}" for k in kinds]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Without a detector the model labels the foreign files: {block['foreign_argmax_labels']}.",
            "",
        ]
    e2e = result["end_to_end"]
    lines += [
        "## End to end: `kidney-edge predict` with the exported files",
        "",
        f"Mixed folder ({e2e['mixed_folder']['holdout_images']} hold-out slices, every 10th, + the foreign corpus), label counts: fp32 {e2e['mixed_folder'].get('fp32')}, "
        f"INT8 {e2e['mixed_folder'].get('int8')}.",
        "",
        f"Throughput on {e2e['throughput']['images']} hold-out images (fp32, `kidney-edge predict` "
        f"whole process, median of {len(e2e['throughput']['seconds']['ood'])} alternating runs each): "
        f"with the detector {e2e['throughput']['images_per_s_median']['ood']:.1f} images/s, with "
        f"`--no-ood` {e2e['throughput']['images_per_s_median']['no_ood']:.1f} images/s; on / off = "
        f"{e2e['throughput']['ood_on_over_off']:.3f}. Seconds per run: {e2e['throughput']['seconds']}.",
        "",
    ]
    lines += _near_lines(result.get("near_distribution"))
    return "\n".join(lines) + "\n"


def _near_lines(near: dict[str, Any] | None) -> list[str]:
    if not near:
        return []
    lines = [
        "## Near distribution: kidney CT from another renderer",
        "",
        f"`kidney-edge predict` on `{near['folder']}` (class folders; slices of a kind the model was never "
        "trained on). Unknown: what the exported detector rejects. Argmax right: the most probable "
        "class names the slice's folder, among the accepted slices and among all of them.",
        "",
        "| file | slices | unknown [95% CI] | argmax right, accepted | argmax right, all |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for precision in ("fp32", "int8"):
        if precision not in near:
            continue
        row = near[precision]
        low, high = row["unknown_rate_ci95"]
        accepted = f"{row['accepted_argmax_right']}/{row['accepted']}" if row["accepted"] else "-"
        lines.append(
            f"| {precision} | {row['images']} | {row['unknown']} ({row['unknown'] / row['images']:.1%}) "
            f"[{low:.1%}, {high:.1%}] | {accepted} | {row['all_argmax_right']}/{row['images']} |"
        )
    return [*lines, ""]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from kidney_edge.export import export_model
    from kidney_edge.phantoms.foreign import FOREIGN_CSV, write_foreign_corpus
    from kidney_edge.runtime import scan_images

    result = harness.start_record()
    args.work.mkdir(parents=True, exist_ok=True)
    foreign_dir = args.work / "foreign"
    shutil.rmtree(foreign_dir, ignore_errors=True)
    write_foreign_corpus(foreign_dir)
    with open(foreign_dir / FOREIGN_CSV, newline="") as handle:
        foreign = [{**row, "path": str(foreign_dir / row["path"])} for row in csv.DictReader(handle)]
    harness.log("exporting (fp32 + INT8, with the export's own detector)")
    exported = export_model(args.run, args.work / "export")
    models = {"fp32": exported.model_path}
    if exported.int8_path is not None:
        models["int8"] = exported.int8_path
    holdout = scan_images(args.holdout)
    result["export_detector"] = {
        "fp32": exported.parity.get("ood"),
        "int8": (exported.int8_gate or {}).get("ood"),
    }
    result["models"] = {
        precision: compare_methods(path, args.run, holdout, foreign) for precision, path in models.items()
    }
    result["end_to_end"] = end_to_end(models, args.holdout, foreign_dir, args.work, args.repeats)
    if args.near is not None:
        result["near_distribution"] = near_distribution(models, args.near, args.work)
    return harness.finish_record(result)


def main() -> None:
    args = parse_args()
    if args.render_only:
        harness.write_markdown(args.out, render(harness.read_results(args.out)))
    else:
        result = measure(args)
        harness.write_results(args.out, result, render(result))
    harness.log(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
