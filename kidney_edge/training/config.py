"""Typed, frozen training configuration: one :class:`PhaseConfig` per phase inside a :class:`TrainConfig`.

Defaults are what a user with a 2-core CPU and no GPU should run (see ``benchmarks/results/training.md``
for the measurements behind them). Validation messages name the CLI flag that sets the field.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from kidney_edge.archs import ALL_BLOCKS, ARCHS, input_size
from kidney_edge.errors import InputError
from kidney_edge.layout import MODELS_ROOT
from kidney_edge.ood import DEFAULT_MAX_ID_REJECTION, DEFAULT_OOD_METHOD, OodMethod
from kidney_edge.spec import RegionRule


class Augmentation(str, Enum):
    """Train-only augmentation policies (``--augment``); see ``training.data.augmentation``."""

    geometric = "geometric"  # small rotations, shifts and zooms
    scanner = "scanner"  # geometric + left-right mirror + what differs between scanners


DEVICES = ("auto", "cpu", "cuda")


def default_run_dir(data_dir: str | Path, models_root: str | Path = MODELS_ROOT) -> Path:
    """``models/<data folder name>-<YYYYmmdd-HHMMSS>``: a new run folder per run, named after its data."""
    name = Path(data_dir).resolve().name or "run"
    return Path(models_root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_run_dir(data_dir: str | Path, out_dir: str | Path | None, *, resume: bool = False) -> Path:
    """``out_dir`` (--out), else a new :func:`default_run_dir`; --resume needs the run's own folder."""
    if out_dir is not None:
        return Path(out_dir)
    if resume:
        raise InputError(
            f"--resume continues an existing run: pass its folder as --out (e.g. {MODELS_ROOT}/RUN)"
        )
    return default_run_dir(data_dir)


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase: ``head`` (frozen backbone) or ``finetune`` (last blocks unfrozen).

    ``unfreeze_blocks`` counts MBConv blocks from the end (see ``KidneyNet.last_blocks_modules``);
    0 trains the classifier only, :data:`ALL_BLOCKS` the whole backbone. ``cache_features``
    computes the frozen backbone's pooled features once and trains the classifier on them; it
    applies only when nothing but the classifier trains and augmentation is off.
    ``layer_decay`` scales the learning rate by ``layer_decay ** k`` for the k-th unfrozen block
    counted from the head (1.0: one rate for all). Early stopping needs ``patience`` epochs
    without a new best of the phase, and never fires in the first half of the phase, while the
    cosine schedule's rate is still high and validation still climbing.
    """

    name: str
    epochs: int
    lr: float
    unfreeze_blocks: int = 0
    augment: bool = False
    cache_features: bool = True
    weight_decay: float = 1e-2  # AdamW's default
    warmup_fraction: float = 0.1  # linear warm-up over this share of the phase's steps, then cosine
    patience: int = 4
    layer_decay: float = 1.0
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # > 0: mixup with Beta(alpha, alpha) shares (training.loop.mixup)
    # The global gradient norm is clipped to this before each step (None: no clipping), as timm's
    # --clip-grad does: against steps at the peak rate that stall fine-tuning at chance
    # (benchmarks/results/recipe.md, recipe lr1e-3-b9-e12-kidneys-clip1).
    clip_grad_norm: float | None = None
    # Validation, best.pt and early stopping read an exponential moving average of the weights,
    # updated after every optimizer step with this decay (None: the trained weights themselves),
    # as timm's --model-ema. The horizon is about 1 / (1 - decay) steps. Off by default: at 0.98
    # it scored 0.578 against 0.601 on the look-alike renderer (benchmarks/results/recipe.md).
    ema_decay: float | None = None
    # Stochastic depth: in training, block i of n (from 0) skips its residual branch with
    # probability drop_path * i / n (backbones.set_drop_path). None: the arch's own
    # (Lite0 none, B0 torchvision's 0.2). Not on for Lite0: at 0.2 it scored 0.548 and 0.574 on
    # the look-alike hold-out against 0.565 and 0.562 (benchmarks/results/holdout.md).
    drop_path: float | None = None
    # BatchNorm of the unfrozen blocks keeps its ImageNet running statistics (its affine weights
    # still train). With batch statistics, validation macro-F1 stayed at 0.39-0.48 against
    # 0.61-0.78 (benchmarks/results/bn_stats.md): the head was fitted on running-statistic
    # features, and the TF port's BN momentum (0.01) lets running statistics catch up only
    # after hundreds of steps.
    freeze_bn_stats: bool = True

    def __post_init__(self) -> None:
        if self.name not in ("head", "finetune"):
            raise InputError(f"phase name must be 'head' or 'finetune', got {self.name!r}")
        if self.epochs < 0:
            raise InputError(f"--epochs-{self.name} must be >= 0, got {self.epochs}")
        if not 0 < self.lr < 1:
            raise InputError(f"--lr-{self.name} must be in (0, 1), got {self.lr}")
        if self.unfreeze_blocks < 0 and self.unfreeze_blocks != ALL_BLOCKS:
            raise InputError(f"--unfreeze-blocks must be >= 0 or 'all', got {self.unfreeze_blocks}")
        if self.name == "head" and self.unfreeze_blocks != 0:
            raise InputError("the head phase trains the classifier only (unfreeze_blocks must be 0)")
        if not 0 <= self.weight_decay < 1:
            raise InputError(f"--weight-decay must be in [0, 1), got {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 1:
            raise InputError(f"warm-up fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.patience < 1:
            raise InputError(f"--patience must be >= 1, got {self.patience}")
        if not 0 < self.layer_decay <= 1:
            raise InputError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.mixup_alpha <= 10:
            raise InputError(f"--mixup must be in [0, 10], got {self.mixup_alpha}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise InputError(f"--clip-grad must be > 0, got {self.clip_grad_norm}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise InputError(f"--ema must be in (0, 1), got {self.ema_decay}")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise InputError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def min_epochs(self) -> int:
        """Epochs that always run: early stopping waits for the second half of the phase."""
        return (self.epochs + 1) // 2

    @property
    def uses_cached_features(self) -> bool:
        return self.cache_features and self.unfreeze_blocks == 0 and not self.augment


def default_head_phase() -> PhaseConfig:
    # On cached features an epoch takes well under a second, so many epochs cost nothing.
    return PhaseConfig(name="head", epochs=15, lr=1e-3, patience=4)


def default_finetune_phase() -> PhaseConfig:
    # The head's rate, the last 9 blocks, 12 epochs on a warm-up + cosine schedule, augmentation
    # on: the recipe with the smallest worst-case shortfall across dataset families
    # (benchmarks/results/recipe.md). lr 1e-4 over 6 blocks stalled below the head's score on
    # look-alike data (docs/architecture.md: test macro-F1 0.51 vs 0.994 on an outside set).
    # Each unfrozen block trains at 0.8 times the rate of the block above it: at one rate for all,
    # fine-tuning diverged at the peak rate on the DICOM series phantom (test macro-F1 0.475
    # against 0.943) and stalled at chance on 1,600 look-alike slices (0.369 after a retry
    # against 0.457).
    return PhaseConfig(
        name="finetune", epochs=12, lr=1e-3, unfreeze_blocks=9, augment=True, patience=6, layer_decay=0.8
    )


@dataclass(frozen=True)
class TrainConfig:
    """Everything one ``kidney-edge train`` run needs; saved as the run's ``config.json``."""

    data_dir: Path
    out_dir: Path
    # Two halves of the kidney band, one kidney each, compared by the head: on the look-alike
    # renderer test macro-F1 0.601 / 0.575 against 0.404 / 0.470 for one view of the band
    # (benchmarks/results/recipe.md).
    arch: str = ARCHS[0]
    image_size: int | None = None  # None: the arch's own (archs.input_size: 448 for the pair)
    # The band about the spine that holds both kidneys: the worst family's test macro-F1 0.334
    # against 0.124 for the whole slice, the look-alike renderer 0.382 / 0.523 against 0.214 /
    # 0.194, both at one fine-tuning rate (benchmarks/results/recipe.md).
    region: str = RegionRule.KIDNEYS.value
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    splits: Path | None = None
    resume: bool = False
    workers: int = 0
    pretrained: bool = True
    weights: Path | None = None
    tumor_recall: float = 0.98
    ood_method: str | None = DEFAULT_OOD_METHOD.value  # None: no OOD detector (--no-ood)
    ood_max_rejection: float = DEFAULT_MAX_ID_REJECTION
    time_budget_min: float | None = None  # fine-tuning epochs are cut to fit (see training.budget)
    augmentation: str = Augmentation.geometric.value
    head: PhaseConfig = field(default_factory=default_head_phase)
    finetune: PhaseConfig = field(default_factory=default_finetune_phase)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "data_dir", Path(self.data_dir))
        if self.image_size is None:
            set_(self, "image_size", input_size(self.arch))
        set_(self, "out_dir", Path(self.out_dir))
        if self.splits is not None:
            set_(self, "splits", Path(self.splits))
        if self.weights is not None:
            set_(self, "weights", Path(self.weights))
        self._validate()

    def _validate(self) -> None:
        from kidney_edge.backbones import available_archs

        if self.arch not in available_archs():
            raise InputError(f"unknown --arch {self.arch!r}; choose one of {', '.join(available_archs())}")
        if not 32 <= self.image_size <= 1024 or self.image_size % 32:
            raise InputError(f"--image-size must be a multiple of 32 in 32..1024, got {self.image_size}")
        if self.region not in {r.value for r in RegionRule}:
            raise InputError(
                f"--region must be one of {', '.join(r.value for r in RegionRule)}, got {self.region!r}"
            )
        if self.batch_size < 2:
            raise InputError(f"--batch-size must be >= 2 (BatchNorm needs it), got {self.batch_size}")
        if self.device not in DEVICES:
            raise InputError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.workers < 0:
            raise InputError(f"--workers must be >= 0, got {self.workers}")
        if not 0 < self.tumor_recall <= 1:
            raise InputError(f"--tumor-recall must be in (0, 1], got {self.tumor_recall}")
        if self.ood_method is not None and self.ood_method not in {m.value for m in OodMethod}:
            raise InputError(
                f"--ood-method must be one of {', '.join(m.value for m in OodMethod)}, got {self.ood_method!r}"
            )
        if not 0 < self.ood_max_rejection < 1:
            raise InputError(f"--ood-max-rejection must be in (0, 1), got {self.ood_max_rejection}")
        if self.augmentation not in {a.value for a in Augmentation}:
            raise InputError(
                f"--augment must be one of {', '.join(a.value for a in Augmentation)}, got {self.augmentation!r}"
            )
        if self.head.name != "head" or self.finetune.name != "finetune":
            raise InputError("TrainConfig.head/finetune must be the 'head' and 'finetune' phases")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise InputError(f"--time-budget must be > 0 minutes, got {self.time_budget_min}")
        if self.head.epochs + self.finetune.epochs == 0:
            raise InputError("nothing to train: --epochs-head and --epochs-finetune are both 0")

    @property
    def phases(self) -> tuple[PhaseConfig, PhaseConfig]:
        return (self.head, self.finetune)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (paths as strings)."""
        data = dataclasses.asdict(self)
        for key in ("data_dir", "out_dir", "splits", "weights"):
            data[key] = None if data[key] is None else str(data[key])
        return data


@dataclass(frozen=True)
class TrainEvent:
    """What the progress callback receives.

    ``kind``: "plan" (``--time-budget`` chose the epochs; ``message`` says how), "phase" (a
    phase starts; ``steps`` = steps per epoch), "step" (one optimizer step done), "epoch" (an
    epoch is done; ``metrics`` holds train/val numbers), "warning" (``message``: something the
    user should know about the run), "finalize" (training is over, the test evaluation runs).
    """

    kind: str
    phase: str = ""
    epoch: int = 0  # 1-based within the phase
    epochs: int = 0
    step: int = 0
    steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    metrics: dict[str, Any]
