"""The trainer's speed per phase, and a linear probe against two-phase training, on this machine.

    python benchmarks/bench_training.py [--n 2000] [--image-size 224] [--timing-batches 0]
    python benchmarks/bench_training.py --render-only      # rewrite training.md from training.json

1. Seconds per epoch for each phase at --image-size on --n phantom images (train split):
   - phase 1 (head only) on cached features: one-off feature extraction + per-epoch time;
   - phase 1 without caching (frozen backbone run every step);
   - phase 2 with the last 3 and the last 6 blocks unfrozen (augmentation on), DataLoader
     workers 0 and 1;
   - one validation pass.
   ``--timing-batches K`` times K batches and scales to the epoch (stated in the output).
2. Test-split metrics of a linear probe (phase 1 only) vs full two-phase training, both with
   ``kidney_edge.training.train`` on the same splits (skip with --skip-metrics).

Writes benchmarks/results/training.json and training.md (atomically), with the load average
before and after: the machine is shared, so read the numbers with it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as harness
import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="phantom images")
    parser.add_argument("--phantom-size", type=int, default=256, help="phantom JPEG side (px)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timing-batches", type=int, default=0, help="0: time whole epochs")
    parser.add_argument("--epochs-head", type=int, default=15)
    parser.add_argument("--epochs-finetune", type=int, default=8)
    parser.add_argument("--unfreeze-blocks", type=int, default=6)
    parser.add_argument("--skip-metrics", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kidney-edge-bench-train")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "training")
    parser.add_argument("--render-only", action="store_true", help="rewrite OUT.md from OUT.json")
    return parser.parse_args()


def phantom(args: argparse.Namespace) -> tuple[Path, Path]:
    """Phantom images + their splits.csv, made once under --cache."""
    from kidney_edge.dataset import SplitConfig, split_dataset
    from kidney_edge.phantoms.classic import synthesize

    data = args.cache / f"phantom-{args.n}-{args.phantom_size}"
    if not (data / "kidneyData.csv").is_file():
        synthesize(data, n=args.n, size=args.phantom_size, seed=0)
    splits = args.cache / f"splits-{args.n}-{args.phantom_size}.csv"
    if not splits.is_file():
        split_dataset(data, splits, SplitConfig(seed=0))
    return data, splits


def timed_pass(run_batches, loader, limit: int) -> dict[str, float]:
    """Seconds for one pass over ``loader`` (or ``limit`` batches scaled to the whole pass)."""
    total = len(loader)
    done, started = 0, time.perf_counter()
    for batch in loader:
        run_batches(batch)
        done += 1
        if limit and done >= limit:
            break
    seconds = time.perf_counter() - started
    return {"seconds_per_epoch": seconds * total / done, "batches_timed": done, "batches_per_epoch": total}


def epoch_timings(args: argparse.Namespace, splits: Path) -> dict[str, Any]:
    from kidney_edge.backbones import backbone_spec_defaults, create_model
    from kidney_edge.dataset import read_splits
    from kidney_edge.spec import ModelSpec
    from kidney_edge.training import PhaseConfig
    from kidney_edge.training import data as run_data
    from kidney_edge.training.distributed import DistContext
    from kidney_edge.training.loop import (
        LoaderSettings,
        _Augmented,
        _HeadOnly,
        build_optimization,
        configure_trainable,
        extract_features,
        make_loader,
        predict_logits,
        set_train_mode,
        train_one_epoch,
    )  # fmt: skip

    rows = read_splits(splits)
    names = run_data.check_splits(rows)
    spec = ModelSpec(
        class_names=names, input_size=args.image_size, **backbone_spec_defaults("efficientnet_lite0")
    )
    train_paths, train_labels = run_data.rows_of(rows, "train", names)
    val_paths, val_labels = run_data.rows_of(rows, "val", names)
    train_set = run_data.SliceDataset(train_paths, train_labels, spec)
    val_set = run_data.SliceDataset(val_paths, val_labels, spec)
    weights = torch.from_numpy(run_data.class_weights(train_labels, len(names)))
    ctx, results = DistContext(), {"train_images": len(train_set), "val_images": len(val_set)}
    model = create_model("efficientnet_lite0", num_classes=len(names))

    def run(phase: PhaseConfig, net, dataset, workers: int = 0) -> dict[str, float]:
        trainable = configure_trainable(model, phase)
        settings = LoaderSettings(args.batch_size, workers, 0)
        loader = make_loader(dataset, settings, ctx, shuffle_seed=1)
        opt = build_optimization(model, net, phase, len(loader), weights, ctx)
        set_train_mode(model, trainable)
        limit = 0 if phase.uses_cached_features else args.timing_batches
        return timed_pass(lambda b: train_one_epoch(opt, [b], ctx.device, lambda s: None), loader, limit)

    settings = LoaderSettings(args.batch_size, 0, 0)
    head = PhaseConfig("head", epochs=1, lr=1e-3)
    started = time.perf_counter()
    features = extract_features(model, train_set, settings, ctx)
    extract_features(model, val_set, settings, ctx)
    results["head_feature_extraction_s"] = time.perf_counter() - started
    cached = torch.utils.data.TensorDataset(features, torch.from_numpy(train_labels))
    results["head_cached"] = run(head, _HeadOnly(model), cached)
    results["head_uncached"] = run(PhaseConfig("head", 1, 1e-3, cache_features=False), model, train_set)
    augmented = _Augmented(train_set, run_data.augmentation(spec))
    for blocks in (3, 6):
        phase = PhaseConfig("finetune", 1, 1e-4, unfreeze_blocks=blocks, augment=True)
        for workers in (0, 1) if blocks == 6 else (0,):
            results[f"finetune_{blocks}_blocks_workers_{workers}"] = run(phase, model, augmented, workers)
    started = time.perf_counter()
    predict_logits(model, val_set, settings, ctx)
    results["validation_pass_s"] = time.perf_counter() - started
    return results


def probe_vs_finetune(args: argparse.Namespace, data: Path, splits: Path) -> dict[str, Any]:
    from kidney_edge.training import PhaseConfig, TrainConfig, train

    results: dict[str, Any] = {}
    runs = {"linear_probe": 0, "two_phase": args.epochs_finetune}
    for name, finetune_epochs in runs.items():
        out = args.cache / f"run-{name}-{args.n}-{args.image_size}-{int(time.time())}"
        config = TrainConfig(
            data_dir=data, out_dir=out, image_size=args.image_size, batch_size=args.batch_size, splits=splits,
            head=PhaseConfig("head", epochs=args.epochs_head, lr=1e-3),
            finetune=PhaseConfig("finetune", epochs=finetune_epochs, lr=1e-4,
                                 unfreeze_blocks=args.unfreeze_blocks, augment=True),
        )  # fmt: skip
        started = time.perf_counter()
        result = train(config)
        test = result.metrics["test"]["argmax"]
        results[name] = {
            "wall_s": time.perf_counter() - started,
            "best_phase": result.metrics["best_phase"],
            "best_epoch": result.metrics["best_epoch"],
            "best_val_macro_f1": result.metrics["best_val_macro_f1"],
            "test_accuracy": test["accuracy"],
            "test_macro_f1": test["macro_f1"],
            "test_recall": {c: row["recall"] for c, row in test["per_class"].items()},
            "epochs_run": len((out / "history.csv").read_text().splitlines()) - 1,
            "run_dir": str(out),
        }
    return results


def _machine_words(record: dict[str, Any]) -> str:
    """CPU, CPUs and torch (older records kept ``processor``, ``cpus`` and ``torch`` in ``machine``)."""
    machine = record["machine"]
    if "processor" in machine:
        return f"{machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']}"
    return f"{machine['cpu_model']}, {machine['cores_host']} CPUs, torch {record['torch']}"


def render(record: dict[str, Any]) -> str:
    t, cfg = record["timings"], record["config"]
    lines = [
        "# Trainer benchmark (issue 4)",
        "",
        f"`{record['command']}`",
        "",
        f"- machine: {_machine_words(record)} with {cfg['threads']} threads",
        f"- load average before / after: {harness.recorded_load(record, 'before')} / "
        f"{harness.recorded_load(record, 'after')} "
        "(the machine is shared: other jobs inflate these numbers)",
        f"- data: {cfg['n']} phantom images ({cfg['phantom_size']} px JPEG), {t['train_images']} train / "
        f"{t['val_images']} val, input {cfg['image_size']} px, batch {cfg['batch_size']}",
        "",
        "## Seconds per training epoch",
        "",
        "| phase | s/epoch | images/s | timed |",
        "| --- | ---: | ---: | --- |",
    ]
    for key, label in [
        ("head_cached", "1: head on cached features"),
        ("head_uncached", "1: head, backbone run every step (no cache)"),
        ("finetune_3_blocks_workers_0", "2: last 3 blocks + head, augmentation, 0 workers"),
        ("finetune_6_blocks_workers_0", "2: last 6 blocks + head, augmentation, 0 workers"),
        ("finetune_6_blocks_workers_1", "2: last 6 blocks + head, augmentation, 1 worker"),
    ]:
        row = t[key]
        timed = "whole epoch" if row["batches_timed"] == row["batches_per_epoch"] else (
            f"{row['batches_timed']} of {row['batches_per_epoch']} batches, scaled")  # fmt: skip
        lines.append(f"| {label} | {row['seconds_per_epoch']:.1f} | "
                     f"{t['train_images'] / row['seconds_per_epoch']:.1f} | {timed} |")  # fmt: skip
    cache_total = t["head_feature_extraction_s"] + t["head_cached"]["seconds_per_epoch"]
    lines += [
        "",
        f"Feature caching costs one pass of {t['head_feature_extraction_s']:.1f} s (train + val features), "
        f"then {t['head_cached']['seconds_per_epoch']:.2f} s per head epoch: "
        f"{t['head_uncached']['seconds_per_epoch'] / t['head_cached']['seconds_per_epoch']:.0f}x faster per epoch; "
        f"{cfg['epochs_head']} head epochs take {t['head_feature_extraction_s'] + cfg['epochs_head'] * t['head_cached']['seconds_per_epoch']:.0f} s "
        f"instead of {cfg['epochs_head'] * t['head_uncached']['seconds_per_epoch']:.0f} s "
        f"(first epoch incl. extraction: {cache_total:.1f} s). A validation pass: {t['validation_pass_s']:.1f} s.",
    ]  # fmt: skip
    if record.get("metrics"):
        lines += ["", "## Test split: linear probe vs two-phase training", "",
                  "| run | test accuracy | test macro-F1 | best val macro-F1 (phase, epoch) | epochs | wall |",
                  "| --- | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
        for name, m in record["metrics"].items():
            lines.append(f"| {name} | {m['test_accuracy']:.3f} | {m['test_macro_f1']:.3f} | "
                         f"{m['best_val_macro_f1']:.3f} ({m['best_phase']}, {m['best_epoch']}) | "
                         f"{m['epochs_run']} | {m['wall_s']:.0f} s |")  # fmt: skip
        lines += ["", "Per-class test recall:", ""]
        for name, m in record["metrics"].items():
            lines.append(f"- {name}: " + ", ".join(f"{c} {r:.2f}" for c, r in m["test_recall"].items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.render_only:
        harness.write_markdown(args.out, render(harness.read_results(args.out)))
        return
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = harness.start_record(config=config, torch=str(torch.__version__))
    data, splits = phantom(args)
    record["timings"] = epoch_timings(args, splits)
    if not args.skip_metrics:
        record["metrics"] = probe_vs_finetune(args, data, splits)
    harness.finish_record(record)
    harness.write_results(args.out, record, render(record))
    print(render(record))
    print(json.dumps(record["timings"], indent=1))


if __name__ == "__main__":
    main()
