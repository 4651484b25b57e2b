"""One phase of training: ``fit_phase`` runs epochs of ``train_one_epoch`` + validation.

The two phases are two calls of ``fit_phase`` with different :class:`PhaseConfig`. Each
epoch ends by writing ``last.pt`` (weights, optimizer, scheduler, RNG, progress) and, when
validation macro-F1 improved, ``best.pt``; every epoch re-seeds from (seed, phase, epoch),
so a run resumed after ``kill -9`` replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from kidney_edge.backbones import set_drop_path
from kidney_edge.checkpoint import load_checkpoint, save_checkpoint
from kidney_edge.io_utils import atomic_write_csv
from kidney_edge.layout import BEST_CHECKPOINT, HISTORY_FILE, LAST_CHECKPOINT
from kidney_edge.metrics import macro_f1
from kidney_edge.training.budget import Deadline
from kidney_edge.training.config import PhaseConfig, TrainEvent
from kidney_edge.training.distributed import DistContext, sharded_map

log = logging.getLogger(__name__)
Progress = Callable[[TrainEvent], None]
PHASE_INDEX = {"head": 0, "finetune": 1}


@dataclass
class RunState:
    """Mutable progress of a run, stored (as plain data) in every ``last.pt``."""

    phase: str = "head"  # the phase in progress, or the last one completed
    phase_epoch: int = 0  # completed epochs of `phase`
    phase_done: bool = False
    best_f1: float = -1.0
    best_phase: str = ""
    best_epoch: int = 0
    # Early stopping counts epochs since the *phase's* best: fine-tuning starts below the head's
    # best while its learning rate is high, and must not be stopped for that.
    phase_best_f1: float = -1.0
    bad_epochs: int = 0  # epochs since phase_best_f1 improved
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    # A fine-tuning attempt whose training loss stays at chance is stopped and retried from the
    # best model at a tenth of the rate; the retry gets the epochs the stalled attempts left.
    stalled: bool = False  # the phase in progress stopped at chance
    retries: int = 0
    lr_scale: float = 1.0
    epochs_lost: int = 0  # epochs spent in stalled attempts of the phase
    notes: list[str] = field(default_factory=list)  # what the run did about it, in words

    def enter_phase(self, name: str) -> None:
        """Start phase ``name`` from its first epoch; the run's best model stays as it is."""
        self.phase, self.phase_epoch, self.phase_done = name, 0, False
        self.phase_best_f1, self.bad_epochs, self.stalled = -1.0, 0, False

    def attempt(self, phase: PhaseConfig) -> PhaseConfig:
        """``phase`` as this attempt runs it: the rate scaled down and the epochs left after stalls."""
        if self.lr_scale == 1.0 and not self.epochs_lost:
            return phase
        return dataclasses.replace(phase, lr=phase.lr * self.lr_scale, epochs=phase.epochs - self.epochs_lost)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        return cls(**data)


@dataclass(frozen=True)
class PhaseData:
    """What a phase reads: datasets and labels of train/val, plus the class weights."""

    train: Dataset  # un-augmented; augmentation is added per phase
    val: Dataset
    train_labels: np.ndarray  # (N,) int64
    val_labels: np.ndarray
    class_weights: torch.Tensor  # (C,) float32
    augment: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Saver:
    """Writes the run's checkpoints (rank 0 only); holds what every checkpoint carries."""

    run_dir: Path
    spec: Any
    config: dict[str, Any]
    context: DistContext

    def save(self, name: str, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
        if self.context.is_main:
            save_checkpoint(self.run_dir / name, model=model, spec=self.spec, config=self.config, extra=extra)


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
    workers: int
    seed: int


# Training loss at or above this share of ln(C), the loss of a uniform guess (class-weighted
# cross-entropy and label smoothing included), for STALL_EPOCHS epochs in a row: the weights
# are not learning. A healthy fine-tuning epoch ends well below it even on hard data
# (benchmarks/results/recipe.md: 0.93 ln 4 after the first epoch of the slowest family).
STALL_LOSS_SHARE = 0.97
STALL_EPOCHS = 3


def stalled_at_chance(train_losses: Sequence[float], num_classes: int) -> bool:
    """True when the last :data:`STALL_EPOCHS` training losses all sat at chance (or are not finite)."""
    recent = list(train_losses)[-STALL_EPOCHS:]
    chance = STALL_LOSS_SHARE * math.log(num_classes)
    return len(recent) == STALL_EPOCHS and all(not loss < chance for loss in recent)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, phase: str, epoch: int) -> int:
    # Distinct, reproducible stream per (seed, phase, epoch): what makes resume exact.
    return seed * 1_000_003 + PHASE_INDEX[phase] * 10_007 + epoch * 101


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": [list(random.getstate()[1]), random.getstate()[0]],
    }


def configure_trainable(model: nn.Module, phase: PhaseConfig) -> list[nn.Module]:
    """Freeze everything but the classifier and the phase's last blocks; return trainable modules."""
    modules = [model.classifier, model.dropout, *model.last_blocks_modules(phase.unfreeze_blocks)]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    return modules


def set_train_mode(model: nn.Module, trainable: list[nn.Module], freeze_bn_stats: bool = False) -> None:
    """Frozen parts (their BatchNorm included) stay in eval mode; only trainable modules train.

    ``freeze_bn_stats`` keeps the trainable modules' BatchNorm in eval mode too (running
    statistics used and kept, affine weights still trained), as detectron2's FrozenBN does for
    small-batch fine-tuning.
    """
    model.eval()
    for module in trainable:
        module.train()
        if freeze_bn_stats:
            for layer in module.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()


def lr_schedule(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to zero, as a multiplier of the phase's LR."""
    warmup = max(1, round(total_steps * warmup_fraction)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class _HeadOnly(nn.Module):
    """The model's head on cached pooled features (``forward_head``, so a model whose head does
    more than one linear layer trains as it predicts); shares parameters with the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.dropout, self.classifier = model.dropout, model.classifier  # what train()/eval() switch
        self.head = model.forward_head  # a bound method: the backbone stays unregistered here

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def make_loader(
    dataset: Dataset, settings: LoaderSettings, context: DistContext, *, shuffle_seed: int | None
) -> DataLoader:
    """Shuffled (train: seeded per epoch) or ordered (inference) batches; sharded under torchrun."""
    generator = None
    sampler = None
    if shuffle_seed is not None:
        # The shuffle order must agree across ranks (DistributedSampler splits one permutation);
        # worker seeds, drawn from `generator`, differ per rank so augmentations do too.
        generator = torch.Generator().manual_seed(shuffle_seed + context.rank)
        if context.distributed:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(dataset, context.world_size, context.rank, seed=settings.seed)
            sampler.set_epoch(shuffle_seed)
        else:
            sampler = RandomSampler(dataset, generator=generator)
    tensors = isinstance(dataset, TensorDataset)  # cached features: no decoding worth a worker
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=sampler,
        num_workers=0 if tensors else settings.workers,
        generator=generator,
        pin_memory=context.device.type == "cuda",
    )


@torch.no_grad()
def _infer(fn: Callable, dataset: Dataset, indices: list[int], settings: LoaderSettings, ctx: DistContext):
    """``fn`` over ``dataset[indices]`` in batches; (len(indices), ...) float32 on CPU."""
    single = dataclasses.replace(ctx, rank=0, world_size=1)
    loader = make_loader(Subset(dataset, indices), settings, single, shuffle_seed=None)
    outputs = []
    for images, _ in loader:
        with autocast(ctx.device):
            out = fn(images.to(ctx.device, non_blocking=True))
        outputs.append(out.float().cpu())
    if not outputs:
        return torch.zeros(0)
    return torch.cat(outputs)


def autocast(device: torch.device) -> torch.autocast:
    # Mixed precision on CUDA only; CPU autocast (bf16) is slower than fp32 on most CPUs.
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def predict_logits(
    model: nn.Module, dataset: Dataset, settings: LoaderSettings, ctx: DistContext
) -> torch.Tensor:
    """(N, C) validation logits, the work split across ranks."""
    model.eval()
    return sharded_map(ctx, len(dataset), lambda idx: _infer(model, dataset, idx, settings, ctx))


def extract_features(
    model: nn.Module, dataset: Dataset, settings: LoaderSettings, ctx: DistContext
) -> torch.Tensor:
    """(N, F) pooled features of the frozen backbone (eval mode), the work split across ranks."""
    model.eval()

    def pooled(images: torch.Tensor) -> torch.Tensor:
        return model.pool_features(model.forward_features(images))

    return sharded_map(ctx, len(dataset), lambda idx: _infer(pooled, dataset, idx, settings, ctx))


def validation_metrics(logits: torch.Tensor, labels: np.ndarray, weights: torch.Tensor) -> dict[str, float]:
    """Class-weighted loss, macro-F1 (:func:`kidney_edge.metrics.macro_f1`, the figure early
    stopping and best.pt select on) and accuracy of (N, C) validation logits."""
    from sklearn.metrics import accuracy_score

    target = torch.from_numpy(labels)
    loss = nn.functional.cross_entropy(logits, target, weight=weights.cpu()).item()
    predicted = logits.argmax(1).numpy()
    return {
        "val_loss": loss,
        "val_macro_f1": macro_f1(labels, predicted, logits.shape[1]),
        "val_accuracy": accuracy_score(labels, predicted),
    }


@dataclass
class Optimization:
    """What one phase steps: the module called per batch, its optimizer, schedule and loss."""

    net: nn.Module  # model, the cached-feature head, or either wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module


def train_one_epoch(
    opt: Optimization, loader: DataLoader, device: torch.device, on_step: Callable[[int], None],
    mixup_alpha: float = 0.0, clip_grad_norm: float | None = None,
) -> dict[str, float]:  # fmt: skip
    """One pass over ``loader``; returns mean train loss and accuracy (against the unmixed labels).

    ``clip_grad_norm``: the global norm of the (unscaled) gradients is clipped to it before each step.
    """
    total_loss, correct, seen = 0.0, 0, 0
    trained = [p for group in opt.optimizer.param_groups for p in group["params"]]
    for step, (inputs, targets) in enumerate(loader, start=1):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        inputs, partners, share = mixup(inputs, targets, mixup_alpha)
        with autocast(device):
            logits = opt.net(inputs)  # (B, C)
            loss = share * opt.loss_fn(logits.float(), targets)
            if share < 1.0:
                loss = loss + (1.0 - share) * opt.loss_fn(logits.float(), partners)
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        if clip_grad_norm is not None:
            opt.scaler.unscale_(opt.optimizer)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(trained, clip_grad_norm)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        total_loss += loss.item() * len(targets)
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(targets)
        on_step(step)
    return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


def mixup(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """mixup (Zhang et al. 2018): each image blended with a shuffled partner at a Beta(alpha, alpha)
    share; returns (mixed inputs, partner labels, share of the original). alpha 0: unchanged."""
    if alpha <= 0 or len(inputs) < 2:
        return inputs, targets, 1.0
    share = float(np.random.beta(alpha, alpha))
    order = torch.randperm(len(inputs), device=inputs.device)
    return share * inputs + (1.0 - share) * inputs[order], targets[order], share


def build_optimization(
    model: nn.Module, net: nn.Module, phase: PhaseConfig, steps_per_epoch: int, weights: torch.Tensor,
    ctx: DistContext,
) -> Optimization:  # fmt: skip
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = DistributedDataParallel(net, device_ids=ids)
    optimizer = torch.optim.AdamW(parameter_groups(model, phase), lr=phase.lr, weight_decay=phase.weight_decay)
    schedule = lr_schedule(phase.epochs * steps_per_epoch, phase.warmup_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.device.type == "cuda")
    loss_fn = ClassWeightedCrossEntropy(weights.to(ctx.device), phase.label_smoothing)
    return Optimization(net, optimizer, scheduler, scaler, loss_fn)


class ClassWeightedCrossEntropy(nn.Module):
    """Cross-entropy with each sample weighted by its true class's weight, the mean over the
    batch's weights; label smoothing is spread evenly over the classes inside each sample's term.

    Not ``nn.CrossEntropyLoss(weight=..., label_smoothing=...)``: that weights the smoothing term
    of every sample by every class's weight, so a rare class's large weight rewards predicting it
    everywhere. On the DICOM series phantom (Stone weight 18.75) fine-tuning with smoothing 0.1
    sat at chance at lr 1e-3 and at the stall rule's retries at 1e-4 and 1e-5
    (benchmarks/results/recipe.md). Without smoothing the two are the same loss.
    """

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_sample = nn.functional.cross_entropy(
            logits, targets, reduction="none", label_smoothing=self.label_smoothing
        )
        weights = self.weight[targets]
        return (weights * per_sample).sum() / weights.sum()


def parameter_groups(model: nn.Module, phase: PhaseConfig) -> list[dict[str, Any]]:
    """AdamW groups: the classifier and conv head at the phase's rate, each unfrozen block below
    them at ``layer_decay`` times the rate of the block above (BEiT's layer-wise decay)."""
    head = [*model.classifier.parameters()]
    groups = [{"params": head, "lr": phase.lr}]
    for depth, module in enumerate(model.last_blocks_modules(phase.unfreeze_blocks)):
        # conv_head (depth 0) shares the classifier's rate; block k from the end gets decay ** k
        groups.append({"params": [*module.parameters()], "lr": phase.lr * phase.layer_decay**depth})
    return [group for group in groups if group["params"]]


def _phase_inputs(model, phase: PhaseConfig, data: PhaseData, settings: LoaderSettings, ctx: DistContext):
    """(net, train dataset, validation function) for the phase; caches features when it can."""
    if phase.uses_cached_features:
        started = time.perf_counter()
        train_features = extract_features(model, data.train, settings, ctx)  # (N, F)
        val_features = extract_features(model, data.val, settings, ctx)
        log.info("cached backbone features in %.1f s", time.perf_counter() - started)
        train_set = TensorDataset(train_features, torch.from_numpy(data.train_labels))

        def validate(scored: nn.Module) -> torch.Tensor:
            scored.eval()
            with torch.no_grad():
                return scored.forward_head(val_features.to(ctx.device)).float().cpu()

        return _HeadOnly(model), train_set, validate
    train_set = data.train
    if phase.augment:
        train_set = _Augmented(data.train, data.augment)
    return model, train_set, lambda scored: predict_logits(scored, data.val, settings, ctx)


def weight_average(model: nn.Module, phase: PhaseConfig) -> AveragedModel | None:
    """The exponential moving average of ``model``'s weights the phase validates and keeps
    (``phase.ema_decay``), or None. BatchNorm buffers are copied from the model, not averaged."""
    if phase.ema_decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(phase.ema_decay), use_buffers=False)


def validated_weights(model: nn.Module, average: AveragedModel | None) -> nn.Module:
    """What validation scores and best.pt keeps: the moving average where there is one."""
    return model if average is None else average.module


class _Augmented(Dataset):
    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


def start_from_best(model: nn.Module, phase_name: str, state: RunState, saver: Saver) -> None:
    """Load the run's best.pt (when there is one) and start ``phase_name`` from its first epoch."""
    if (saver.run_dir / BEST_CHECKPOINT).is_file():
        saver.context.barrier()
        model.load_state_dict(load_checkpoint(saver.run_dir / BEST_CHECKPOINT)["model_state"])
    state.enter_phase(phase_name)


def fit_phase(
    model: nn.Module,
    phase: PhaseConfig,
    data: PhaseData,
    state: RunState,
    saver: Saver,
    settings: LoaderSettings,
    resume_from: dict[str, Any] | None = None,
    progress: Progress | None = None,
    deadline: Deadline | None = None,
) -> None:
    """Train ``phase`` from ``state.phase_epoch`` to its end, an early stop, or ``deadline``
    (``--time-budget``), checkpointing each epoch."""
    ctx, notify = saver.context, progress or (lambda event: None)
    if state.phase != phase.name:  # entering this phase: start from the best model so far
        start_from_best(model, phase.name, state, saver)
    if phase.epochs == 0 or state.phase_epoch >= phase.epochs:
        state.phase_done = True
        return
    trainable = configure_trainable(model, phase)
    if phase.drop_path is not None:
        set_drop_path(model, phase.drop_path)
    seed_everything(epoch_seed(settings.seed, phase.name, 0) + ctx.rank)
    net, train_set, validate = _phase_inputs(model, phase, data, settings, ctx)
    steps = len(make_loader(train_set, settings, ctx, shuffle_seed=0))
    opt = build_optimization(model, net, phase, steps, data.class_weights, ctx)
    average = weight_average(model, phase)
    if resume_from is not None:
        _restore(opt, average, resume_from)
    scored = validated_weights(model, average)
    notify(TrainEvent("phase", phase.name, state.phase_epoch, phase.epochs, 0, steps))
    for epoch in range(state.phase_epoch + 1, phase.epochs + 1):
        if _out_of_time(deadline, phase, state, notify):
            break
        started = time.perf_counter()
        seed = epoch_seed(settings.seed, phase.name, epoch)
        seed_everything(seed + ctx.rank)  # augmentation and dropout differ per rank
        loader = make_loader(train_set, settings, ctx, shuffle_seed=seed)
        set_train_mode(model, trainable, phase.freeze_bn_stats)

        def on_step(step: int, epoch: int = epoch) -> None:
            if average is not None:
                average.update_parameters(model)
            notify(TrainEvent("step", phase.name, epoch, phase.epochs, step, steps))

        metrics = train_one_epoch(opt, loader, ctx.device, on_step, phase.mixup_alpha, phase.clip_grad_norm)
        metrics.update(validation_metrics(validate(scored), data.val_labels, data.class_weights))
        metrics.update(seconds=time.perf_counter() - started, lr=opt.scheduler.get_last_lr()[0])
        _end_epoch(model, phase, epoch, metrics, state, saver, opt, len(data.class_weights), average)
        notify(TrainEvent("epoch", phase.name, epoch, phase.epochs, steps, steps, metrics))
        if state.phase_done:
            break


def _out_of_time(deadline: Deadline | None, phase: PhaseConfig, state: RunState, notify: Progress) -> bool:
    """True (and said in words) when the next epoch, at the pace of the phase's last one, would end
    past ``deadline``; the phase's first epoch always runs, so a budgeted run trains something."""
    done = [row["seconds"] for row in state.history if row["phase"] == phase.name]
    if deadline is None or not done or deadline.next_epoch_fits(done[-1]):
        return False
    note = deadline.stop_note(phase.name, state.phase_epoch, phase.epochs, done[-1])
    state.notes.append(note)
    state.phase_done = True
    log.warning(note)
    notify(TrainEvent("warning", message=note))
    return True


def _end_epoch(
    model, phase: PhaseConfig, epoch: int, metrics: dict, state: RunState, saver: Saver, opt,
    num_classes: int, average: AveragedModel | None = None,
) -> None:  # fmt: skip
    """Book-keeping in crash-safe order: decide, then best.pt (the validated weights), then
    last.pt (the trained weights, optimizer and weight average: the resume point)."""
    f1 = metrics["val_macro_f1"]
    improved = f1 > state.best_f1  # best.pt: the best model of the whole run
    if improved:
        state.best_f1, state.best_phase, state.best_epoch = f1, phase.name, epoch
    if f1 > state.phase_best_f1:
        state.phase_best_f1, state.bad_epochs = f1, 0
    else:
        state.bad_epochs += 1
    state.phase_epoch = epoch
    stop_early = state.bad_epochs >= phase.patience and epoch >= phase.min_epochs
    earlier = [row["train_loss"] for row in state.history if row["phase"] == phase.name]
    this_attempt = [*earlier[len(earlier) - (epoch - 1):], metrics["train_loss"]]  # epochs 1..epoch
    state.stalled = phase.unfreeze_blocks != 0 and stalled_at_chance(this_attempt, num_classes)
    state.phase_done = epoch == phase.epochs or stop_early or state.stalled
    if stop_early:
        log.info("early stop in %s after epoch %d: no val macro-F1 gain for %d epochs", phase.name, epoch,
                 phase.patience)  # fmt: skip
    state.history.append({"phase": phase.name, "epoch": epoch, **metrics, "best": improved})
    if improved:
        saver.save(
            BEST_CHECKPOINT,
            validated_weights(model, average),
            {"phase": phase.name, "epoch": epoch, "val_macro_f1": state.best_f1},
        )
    saver.save(LAST_CHECKPOINT, model, training_state(state, opt, average))
    if saver.context.is_main:
        write_history(saver.run_dir / HISTORY_FILE, state.history)
    saver.context.barrier()


def training_state(
    state: RunState, opt: Optimization | None, average: AveragedModel | None = None
) -> dict[str, Any]:
    extra: dict[str, Any] = {"run_state": state.to_dict(), "phase": state.phase, "epoch": state.phase_epoch}
    extra["rng"] = rng_state()
    if opt is not None:
        extra["optimizer"] = opt.optimizer.state_dict()
        extra["scheduler"] = opt.scheduler.state_dict()
        extra["scaler"] = opt.scaler.state_dict()
    if average is not None:
        extra["weight_average"] = average.state_dict()
    return extra


def _restore(opt: Optimization, average: AveragedModel | None, checkpoint: dict[str, Any]) -> None:
    opt.optimizer.load_state_dict(checkpoint["optimizer"])
    opt.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler"):
        opt.scaler.load_state_dict(checkpoint["scaler"])
    if average is not None and "weight_average" in checkpoint:
        average.load_state_dict(checkpoint["weight_average"])


HISTORY_COLUMNS = ("phase", "epoch", "train_loss", "train_accuracy", "val_loss", "val_macro_f1",
                   "val_accuracy", "lr", "seconds", "best")  # fmt: skip


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """history.csv: one row per finished epoch, :data:`HISTORY_COLUMNS`."""
    atomic_write_csv(path, history, HISTORY_COLUMNS)


def iter_phases(phases: Sequence[PhaseConfig], state: RunState) -> Iterator[PhaseConfig]:
    """Phases still to run: skips those finished before a resume."""
    order = [p.name for p in phases]
    for phase in phases:
        if order.index(phase.name) < order.index(state.phase):
            continue
        if phase.name == state.phase and state.phase_done and not state.stalled:
            continue
        yield phase
