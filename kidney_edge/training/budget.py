"""``--time-budget``: measure this machine's training speed on the first batches, size the epochs to fit.

The cost model is per image: a fine-tuning step (forward + backward through the unfrozen
blocks, with augmentation and decoding) and a frozen forward pass (feature caching,
validation, calibration and the test evaluation). Head epochs on cached features cost next
to nothing, so the budget goes to fine-tuning. Epochs are only ever cut, never added: the
budget is an upper bound, and the configured epochs are what the recipe benchmark validated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from kidney_edge.errors import InputError
from kidney_edge.training.config import TrainConfig

log = logging.getLogger(__name__)
# Seconds outside the per-image costs: model and data set-up, report plots, checkpoints.
FIXED_OVERHEAD_S = 30.0


@dataclass(frozen=True)
class Speed:
    """Measured seconds per image on this machine."""

    finetune_s: float  # one training step's share (forward + backward, augmentation, decoding)
    frozen_s: float  # one inference forward pass's share (decoding included)


@dataclass(frozen=True)
class EpochPlan:
    head_epochs: int
    finetune_epochs: int
    estimated_s: float
    budget_s: float
    speed: Speed
    end_s: float = 0.0  # estimated seconds after fine-tuning: calibration, test evaluation, overhead

    @property
    def over_budget(self) -> bool:
        return self.estimated_s > self.budget_s

    def describe(self) -> str:
        over = " (over budget: one epoch is the least a run trains)" if self.over_budget else ""
        return (
            f"time budget {self.budget_s / 60:.1f} min: {self.head_epochs} head + {self.finetune_epochs} "
            f"fine-tuning epochs, estimated {self.estimated_s / 60:.1f} min{over} (measured "
            f"{1 / self.speed.finetune_s:.1f} images/s fine-tuning, {1 / self.speed.frozen_s:.1f} images/s inference)"
        )


def plan_epochs(config: TrainConfig, speed: Speed, n_train: int, n_val: int, n_test: int) -> EpochPlan:
    """The most fine-tuning epochs (up to the configured ones) whose estimated time fits the budget.

    Estimate = fixed overhead + feature caching (train + val, frozen) + per fine-tuning epoch
    (train steps + a validation pass) + the end of the run (val calibration + test evaluation).
    When not even one epoch fits, the plan keeps one and says it is over budget: a run that
    trains nothing is of no use, and the estimate is only as good as the machine's load allows.
    """
    if config.time_budget_min is None:
        raise InputError("plan_epochs needs TrainConfig.time_budget_min (--time-budget)")
    budget = config.time_budget_min * 60.0
    end = FIXED_OVERHEAD_S + (n_val + n_test) * speed.frozen_s
    fixed = end + (n_train + n_val) * speed.frozen_s
    per_epoch = n_train * speed.finetune_s + n_val * speed.frozen_s
    wanted = config.finetune.epochs
    fits = math.floor((budget - fixed) / per_epoch) if per_epoch > 0 else wanted
    epochs = max(1, min(wanted, fits))
    return EpochPlan(config.head.epochs, epochs, fixed + epochs * per_epoch, budget, speed, end)


@dataclass(frozen=True)
class Deadline:
    """When the last fine-tuning epoch must end for the run to finish inside its budget.

    The plan sizes the epochs from a speed measured at the start; a machine that slows down
    later (other jobs on the cores) would carry the run past its budget, so each epoch after
    the first is started only when, at the pace of the epoch before it, it ends in time.
    """

    at: float  # time.monotonic() seconds
    budget_s: float

    @classmethod
    def of(cls, plan: EpochPlan, started: float) -> Deadline:
        return cls(started + plan.budget_s - plan.end_s, plan.budget_s)

    def next_epoch_fits(self, last_epoch_s: float, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) + last_epoch_s <= self.at

    def stop_note(self, phase: str, epoch: int, epochs: int, last_epoch_s: float) -> str:
        name = "fine-tuning" if phase == "finetune" else f"the {phase} phase"
        return (
            f"time budget {self.budget_s / 60:.1f} min: {name} stopped after epoch {epoch} of "
            f"{epochs}, because another epoch at the last one's pace ({last_epoch_s:.0f} s) would end "
            "past the budget (epochs ran slower than measured at the start, e.g. under load); the "
            "best model so far is kept"
        )


def apply_plan(config: TrainConfig, plan: EpochPlan) -> TrainConfig:
    """``config`` with the plan's epochs (patience kept, so early stopping still works)."""
    finetune = dataclasses.replace(config.finetune, epochs=plan.finetune_epochs)
    return dataclasses.replace(config, finetune=finetune)


def measure_speed(step: Callable[[], int], infer: Callable[[], int], repeats: int = 3) -> Speed:
    """Seconds per image of ``step`` (one training batch) and ``infer`` (one inference batch).

    Each callable runs one batch and returns its image count; the first call of each is a
    warm-up and is not timed (allocator, thread pool and kernel selection).
    """
    return Speed(_per_image(step, repeats), _per_image(infer, repeats))


def _per_image(run_batch: Callable[[], int], repeats: int) -> float:
    run_batch()
    started, images = time.perf_counter(), 0
    for _ in range(repeats):
        images += run_batch()
    return (time.perf_counter() - started) / max(images, 1)
