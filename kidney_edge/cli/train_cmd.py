"""`kidney-edge train`: two-phase transfer learning into a run folder (thin wrapper over ``training.train``)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kidney_edge.archs import DEFAULT_INPUT_SIZE, EFFICIENTNET_LITE0_PAIR, input_size
from kidney_edge.cli._app import PANEL_MODEL, Renamed, app, console, library_errors, print_headline
from kidney_edge.ood import OodMethod
from kidney_edge.spec import RegionRule
from kidney_edge.training.config import (
    ALL_BLOCKS,
    ARCHS,
    DEVICES,
    MODELS_ROOT,
    Augmentation,
    TrainConfig,
    default_finetune_phase,
    default_head_phase,
)

if TYPE_CHECKING:  # pragma: no cover
    from kidney_edge.training import TrainEvent, TrainResult

# Choices from the library's own lists.
Arch = Enum("Arch", {name: name for name in ARCHS}, type=str)
Device = Enum("Device", {name: name for name in DEVICES}, type=str)
# The library's defaults, shown in --help: TrainConfig's class attributes are its field defaults
# (an instance would validate --arch against the backbone registry, which imports torch).
_RUN = TrainConfig
_HEAD, _FINETUNE = default_head_phase(), default_finetune_phase()


def _blocks(text: str) -> int:
    if text.strip().lower() == "all":
        return ALL_BLOCKS
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"expected a number of blocks or 'all', got {text!r}") from None


@app.command(
    rich_help_panel=PANEL_MODEL,
    old_spellings=(
        Renamed("--workers", "--loader-workers"),
        Renamed("--time-budget", "--time-budget-min"),
        Renamed("--splits", "--splits-csv"),
    ),
)
def train(
    data: Annotated[
        Path, typer.Argument(help="Image folder laid out as DATA/<Class>/<image> (e.g. Kaggle).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help=f"Folder of the run to create (or continue with --resume); default: {MODELS_ROOT}/<DATA name>-<time>.",
        ),
    ] = None,
    arch: Annotated[
        Arch,
        typer.Option(
            "--arch",
            help=f"Backbone. {EFFICIENTNET_LITE0_PAIR}: Lite0 reading the view as two halves, one kidney each, "
            "the right one mirrored, and comparing them.",
        ),
    ] = Arch(_RUN.arch),
    epochs_head: Annotated[
        int, typer.Option("--epochs-head", help="Phase 1 epochs (frozen backbone, cached features).")
    ] = _HEAD.epochs,
    epochs_finetune: Annotated[
        int, typer.Option("--epochs-finetune", help="Phase 2 epochs.")
    ] = _FINETUNE.epochs,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Training images per step.")
    ] = _RUN.batch_size,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            help=f"Input side in pixels, a multiple of 32; default: the arch's ({DEFAULT_INPUT_SIZE}; "
            f"{input_size(EFFICIENTNET_LITE0_PAIR)} for {EFFICIENTNET_LITE0_PAIR}, each kidney at half of it).",
        ),
    ] = None,
    region: Annotated[
        RegionRule,
        typer.Option(
            help="What the model sees of each slice: the whole image, or the band about the spine that "
            "holds both kidneys (found in each image; the whole image where none is found). The choice "
            "travels in the model's spec, so export, predict and serve crop alike.",
        ),
    ] = RegionRule(_RUN.region),
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed of the split, initialisation and batches.")
    ] = _RUN.seed,
    device: Annotated[Device, typer.Option("--device", help="auto: CUDA when available.")] = Device(
        _RUN.device
    ),
    splits_csv: Annotated[
        Path | None,
        typer.Option(
            "--splits-csv",
            metavar="FILE",
            help="An existing splits.csv (kidney-edge split); default: split DATA 70/15/15.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out after its last epoch.")
    ] = False,
    unfreeze_blocks: Annotated[
        str,
        typer.Option(
            "--unfreeze-blocks",
            metavar="N|all",
            help="Phase 2 trains the last N of 16 MBConv blocks + conv head, or 'all' (the whole backbone).",
        ),
    ] = str(_FINETUNE.unfreeze_blocks),
    lr_head: Annotated[
        float, typer.Option("--lr-head", help="Phase 1 learning rate (head only).")
    ] = _HEAD.lr,
    lr_finetune: Annotated[
        float, typer.Option("--lr-finetune", help="Phase 2 learning rate at the head (see --layer-decay).")
    ] = _FINETUNE.lr,
    layer_decay: Annotated[
        float,
        typer.Option("--layer-decay", help="Phase 2 LR multiplier per block away from the head (1: one LR)."),
    ] = _FINETUNE.layer_decay,
    label_smoothing: Annotated[
        float, typer.Option("--label-smoothing", help="Phase 2 label smoothing of the cross-entropy.")
    ] = _FINETUNE.label_smoothing,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="Phase 2 AdamW weight decay (decoupled, as in timm).")
    ] = _FINETUNE.weight_decay,
    patience: Annotated[
        int,
        typer.Option(
            "--patience", help="Phase 2 stops after N epochs without gain (never in its first half)."
        ),
    ] = _FINETUNE.patience,
    time_budget_min: Annotated[
        float | None,
        typer.Option(
            "--time-budget-min",
            metavar="MINUTES",
            help="Time budget in minutes: measure this machine on the first batches and cut fine-tuning "
            "epochs to fit; default: no budget.",
        ),
    ] = None,
    loader_workers: Annotated[
        int,
        typer.Option(
            "--loader-workers",
            help="DataLoader worker processes that decode training images (0: in the training process).",
        ),
    ] = _RUN.workers,
    no_pretrained: Annotated[bool, typer.Option("--no-pretrained", help="Random init, no ImageNet.")] = False,
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            metavar="FILE",
            help="ImageNet weights file (original key names), instead of the installed package's.",
        ),
    ] = None,
    tumor_recall: Annotated[
        float, typer.Option("--tumor-recall", help="Tumor recall the decision rule targets on val.")
    ] = _RUN.tumor_recall,
    ood_method: Annotated[
        OodMethod,
        typer.Option("--ood-method", help="Out-of-distribution detector fitted on train, threshold on val."),
    ] = OodMethod(_RUN.ood_method),
    no_ood: Annotated[
        bool, typer.Option("--no-ood", help="Fit no OOD detector (nothing is labelled unknown).")
    ] = False,
    ood_max_rejection: Annotated[
        float,
        typer.Option(
            "--ood-max-rejection",
            help="Share of in-distribution val images the OOD threshold may reject (95% upper bound).",
        ),
    ] = _RUN.ood_max_rejection,
    update_bn_stats: Annotated[
        bool,
        typer.Option(
            "--update-bn-stats",
            help="Phase 2 re-estimates BatchNorm statistics from batches (default: keep ImageNet's).",
        ),
    ] = not _FINETUNE.freeze_bn_stats,
    augment: Annotated[
        Augmentation,
        typer.Option(
            help="Phase 2 augmentation: geometric (small rotations, shifts, zooms) or scanner (also "
            "left-right mirror, window, kernel blur/sharpen, noise, JPEG quality).",
        ),
    ] = Augmentation(_RUN.augmentation),
    mixup: Annotated[
        float,
        typer.Option(help="Phase 2 mixup: blend image pairs at Beta(A, A) shares (0: off).", metavar="A"),
    ] = _FINETUNE.mixup_alpha,
    ema: Annotated[
        float | None,
        typer.Option(
            "--ema",
            help="Phase 2 validates and keeps an exponential moving average of the weights, updated "
            "each step with this decay (e.g. 0.98; default: the trained weights).",
            metavar="DECAY",
        ),
    ] = _FINETUNE.ema_decay,
    drop_path: Annotated[
        float | None,
        typer.Option(
            "--drop-path",
            help="Phase 2 stochastic depth: block i of n skips its residual branch with probability "
            "RATE * i / n (e.g. 0.2; default: the arch's own, none for Lite0).",
            metavar="RATE",
        ),
    ] = _FINETUNE.drop_path,
    clip_grad: Annotated[
        float | None,
        typer.Option(
            "--clip-grad",
            help="Clip the global gradient norm to NORM before each step, in both phases (default: no clipping).",
            metavar="NORM",
        ),
    ] = _FINETUNE.clip_grad_norm,
) -> None:
    """Train an EfficientNet classifier in two phases (frozen backbone, then fine-tuning).

    The defaults are the recipe that held across every dataset family of the recipe
    benchmark (benchmarks/results/recipe.md).
    """
    import dataclasses

    from kidney_edge.training import train as run_training
    from kidney_edge.training.config import resolve_run_dir
    from kidney_edge.training.distributed import is_main_process

    with library_errors():
        config = TrainConfig(
            data_dir=data, out_dir=resolve_run_dir(data, out, resume=resume), arch=arch.value, image_size=image_size, region=region.value, batch_size=batch_size,
            seed=seed, device=device.value, splits=splits_csv, resume=resume, workers=loader_workers,
            pretrained=not no_pretrained, weights=weights, tumor_recall=tumor_recall,
            ood_method=None if no_ood else ood_method.value, ood_max_rejection=ood_max_rejection,
            time_budget_min=time_budget_min, augmentation=augment.value,
            head=dataclasses.replace(_HEAD, epochs=epochs_head, lr=lr_head, clip_grad_norm=clip_grad),
            finetune=dataclasses.replace(
                _FINETUNE, epochs=epochs_finetune, lr=lr_finetune, unfreeze_blocks=_blocks(unfreeze_blocks),
                patience=patience, layer_decay=layer_decay, label_smoothing=label_smoothing, weight_decay=weight_decay,
                freeze_bn_stats=not update_bn_stats, mixup_alpha=mixup, clip_grad_norm=clip_grad,
                ema_decay=ema, drop_path=drop_path),
        )  # fmt: skip
        main_process = is_main_process()  # under torchrun only rank 0 draws
        with _EpochProgress(enabled=main_process) as bar:
            result = run_training(config, progress=bar.update)
    if main_process:
        _render(result)


class _EpochProgress:
    """Rich progress bar per epoch plus one summary line per finished epoch."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.enabled = enabled
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True, disable=not enabled,
        )  # fmt: skip
        self.task = None

    def __enter__(self) -> _EpochProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def update(self, event: TrainEvent) -> None:
        if not self.enabled:
            return
        if event.kind in ("phase", "epoch") and self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None
        if event.kind == "step":
            if self.task is None:
                label = f"{event.phase} epoch {event.epoch}/{event.epochs}"
                self.task = self.bar.add_task(label, total=event.steps)
            self.bar.update(self.task, completed=event.step)
        elif event.kind == "epoch":
            m = event.metrics
            self.bar.console.print(
                f"{event.phase} {event.epoch}/{event.epochs}: loss {m['train_loss']:.4f}  "
                f"val loss {m['val_loss']:.4f}  val macro-F1 {m['val_macro_f1']:.4f}  "
                f"val acc {m['val_accuracy']:.4f}  ({m['seconds']:.1f} s)"
            )
        elif event.kind == "plan":
            self.bar.console.print(f"[cyan]{event.message}[/]")
        elif event.kind == "warning":
            self.bar.console.print(f"[yellow]warning:[/] {event.message}")
        elif event.kind == "finalize":
            self.bar.console.print("evaluating the best model on the test split ...")


def _render(result: TrainResult) -> None:
    metrics = result.metrics
    console.print(
        f"best: {metrics['best_phase']} epoch {metrics['best_epoch']}, "
        f"val macro-F1 {metrics['best_val_macro_f1']:.4f} -> {result.best_checkpoint}"
    )
    if metrics.get("test"):
        print_headline(metrics["test"], f"Test split ({result.run_dir})")
    console.print(f"run folder: {result.run_dir} (metrics.json, report.html, history.csv)")
