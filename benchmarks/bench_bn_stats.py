"""Fine-tuning with BatchNorm statistics frozen (the default) vs re-estimated from batches.

    python benchmarks/bench_bn_stats.py [--n 800] [--image-size 160] [--epochs-finetune 4]
    python benchmarks/bench_bn_stats.py --render-only      # rewrite bn_stats.md from bn_stats.json

Trains the same two-phase recipe twice with ``kidney_edge.training.train`` on one phantom
split (the demo's phantom settings: difficulty 0.25, 1-3 slices per patient), once with
``PhaseConfig.freeze_bn_stats=True`` and once with ``False`` (CLI ``--update-bn-stats``), and
records each fine-tuning epoch's train loss and validation macro-F1, plus the test figures.
Writes benchmarks/results/bn_stats.json and bn_stats.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path
from typing import Any

import _harness as harness


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=800, help="phantom images")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--epochs-head", type=int, default=10)
    parser.add_argument("--epochs-finetune", type=int, default=4)
    parser.add_argument("--unfreeze-blocks", type=int, default=9)
    parser.add_argument("--lr-finetune", type=float, default=3e-4)
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="kidney-edge-bn-")))
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "bn_stats")
    parser.add_argument("--render-only", action="store_true", help="rewrite OUT.md from OUT.json")
    return parser.parse_args()


def run(args: argparse.Namespace, data: Path, splits: Path, freeze: bool) -> dict[str, Any]:
    from kidney_edge.training import PhaseConfig, TrainConfig, train

    name = "frozen" if freeze else "batch"
    config = TrainConfig(
        data_dir=data, out_dir=args.work / name, splits=splits, image_size=args.image_size, device="cpu",
        head=PhaseConfig("head", epochs=args.epochs_head, lr=3e-3, patience=args.epochs_head),
        finetune=PhaseConfig("finetune", epochs=args.epochs_finetune, lr=args.lr_finetune,
                             unfreeze_blocks=args.unfreeze_blocks, augment=True,
                             patience=args.epochs_finetune, freeze_bn_stats=freeze),
    )  # fmt: skip
    result = train(config)
    with open(result.run_dir / "history.csv", newline="") as handle:
        history = [row for row in csv.DictReader(handle) if row["phase"] == "finetune"]
    test = result.metrics["test"]["argmax"]
    return {
        "bn_statistics": name,
        "finetune_epochs": [
            {
                "epoch": int(r["epoch"]),
                "train_loss": round(float(r["train_loss"]), 4),
                "val_macro_f1": round(float(r["val_macro_f1"]), 4),
            }
            for r in history
        ],  # fmt: skip
        "test": {
            "accuracy": test["accuracy"],
            "macro_f1": test["macro_f1"],
            "tumor_recall": test["per_class"]["Tumor"]["recall"],
        },  # fmt: skip
    }


def render(record: dict[str, Any]) -> str:
    args, runs = argparse.Namespace(**record["args"]), record["runs"]
    # Older records kept no machine facts; the CPU count then is unrecorded.
    cpus = record["machine"]["cores_host"] if "machine" in record else "unrecorded"
    lines = [
        "# Fine-tuning: BatchNorm statistics frozen vs re-estimated",
        "",
        f"`benchmarks/bench_bn_stats.py`: {args.n} phantom images (difficulty 0.25, 1-3 slices per "
        f"patient), {args.image_size} px, head {args.epochs_head} epochs, then {args.epochs_finetune} "
        f"epochs of the last {args.unfreeze_blocks} blocks at lr {args.lr_finetune}; {cpus} CPUs, "
        f"load average at the end {harness.recorded_load(record, 'after')}. The best checkpoint (of either phase) is what the test "
        "figures use.",
        "",
        "| BN statistics | fine-tuning epoch | train loss | val macro-F1 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for run_ in runs:
        for row in run_["finetune_epochs"]:
            lines.append(f"| {run_['bn_statistics']} | {row['epoch']} | {row['train_loss']:.3f} | "
                         f"{row['val_macro_f1']:.3f} |")  # fmt: skip
    lines += [
        "",
        "| BN statistics | test accuracy | test macro-F1 | test Tumor recall |",
        "| --- | ---: | ---: | ---: |",
    ]
    for run_ in runs:
        t = run_["test"]
        lines.append(
            f"| {run_['bn_statistics']} | {t['accuracy']:.3f} | {t['macro_f1']:.3f} | {t['tumor_recall']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.render_only:
        harness.write_markdown(args.out, render(harness.read_results(args.out)))
        return
    from kidney_edge.dataset import SplitConfig, split_dataset
    from kidney_edge.phantoms.classic import synthesize

    record = harness.start_record(args={k: str(v) for k, v in vars(args).items()})
    data, splits = args.work / "data", args.work / "splits.csv"
    synthesize(data, n=args.n, seed=0, size=512, difficulty=0.25, slices_per_patient=(1, 3))
    split_dataset(data, splits, SplitConfig(seed=0))
    record["runs"] = [run(args, data, splits, freeze) for freeze in (True, False)]
    harness.finish_record(record)
    harness.write_results(args.out, record, render(record))
    print(json.dumps(record["runs"], indent=2))


if __name__ == "__main__":
    main()
