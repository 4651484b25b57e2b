"""``train(config)``: splits -> spec -> phase 1 (head) -> phase 2 (fine-tune) -> test evaluation."""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kidney_edge.errors import InputError
from kidney_edge.io_utils import atomic_write_json, atomic_write_text
from kidney_edge.layout import BEST_CHECKPOINT, CONFIG_FILE, LAST_CHECKPOINT, SPEC_FILE, SPLITS_FILE
from kidney_edge.spec import ModelSpec, RegionRule
from kidney_edge.training import data as run_data
from kidney_edge.training import distributed
from kidney_edge.training.config import TrainConfig, TrainEvent, TrainResult
from kidney_edge.training.loop import (
    STALL_EPOCHS,
    STALL_LOSS_SHARE,
    LoaderSettings,
    PhaseData,
    Progress,
    RunState,
    Saver,
    fit_phase,
    iter_phases,
    seed_everything,
    start_from_best,
    training_state,
)

log = logging.getLogger(__name__)
# Fields that shape the weights: a resumed run must use the same values to continue exactly.
RESUME_FIELDS = ("arch", "image_size", "region", "batch_size", "seed", "pretrained", "head", "finetune")
# Resume fields added after runs were saved without them, with the value such a run trained with
# (not today's default: runs before the region rule saw the whole slice); the same for the fields
# of a saved phase (runs before gradient clipping did not clip).
BEFORE_FIELD_EXISTED = {"region": RegionRule.WHOLE.value}
PHASE_BEFORE_FIELD_EXISTED = {"clip_grad_norm": None, "ema_decay": None, "drop_path": None}


def train(config: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Train a classifier on ``config.data_dir`` into ``config.out_dir``; see ``TrainConfig``.

    Under ``torchrun`` every process calls this; only rank 0 writes files.
    """
    context = distributed.setup(config.device)
    try:
        return _train(config, context, progress)
    finally:
        distributed.teardown(context)


def _train(config: TrainConfig, ctx: distributed.DistContext, progress: Progress | None) -> TrainResult:
    started = time.monotonic()  # --time-budget counts from here
    config = _planned_on_resume(config)
    run_dir = config.out_dir
    if config.pretrained or config.weights is not None:  # fail before anything is written
        from kidney_edge.backbones import pretrained_weights_path

        pretrained_weights_path(config.arch, config.weights)
    resume_from = _check_run_folder(config) if ctx.is_main else None
    rows = _splits(config, ctx)
    class_names = run_data.check_splits(rows)
    spec = _make_spec(config, class_names, rows)
    data = _phase_data(config, spec, rows)
    recorded = _recorded_config(config, class_names, data, ctx)
    if ctx.is_main:
        atomic_write_text(run_dir / SPEC_FILE, spec.to_json() + "\n")
        atomic_write_json(run_dir / CONFIG_FILE, recorded)
    ctx.barrier()
    if resume_from is None and config.resume and (run_dir / LAST_CHECKPOINT).is_file():
        resume_from = _load_last(run_dir)  # ranks > 0 read what rank 0 checked
    seed_everything(config.seed)
    from kidney_edge.backbones import create_model

    model = create_model(config.arch, num_classes=len(class_names), pretrained=config.pretrained,
                         weights=config.weights).to(ctx.device)  # fmt: skip
    deadline = None
    if config.time_budget_min is not None and resume_from is None:
        config, deadline = _fit_budget(config, model, data, rows, ctx, progress, started)
    state = RunState()
    if resume_from is not None:
        model.load_state_dict(resume_from["model_state"])
        state = RunState.from_dict(resume_from["run_state"])
        log.info("resuming %s after %s epoch %d", run_dir, state.phase, state.phase_epoch)
    saver = Saver(run_dir, spec, recorded, ctx)
    settings = LoaderSettings(config.batch_size, config.workers, config.seed)
    for phase in iter_phases(config.phases, state):
        if state.stalled and not _retry_stalled(phase, state, model, saver, progress):
            continue  # resumed just after a stall that is not retried
        mid_phase = resume_from is not None and state.phase == phase.name and state.phase_epoch > 0
        fit_phase(model, state.attempt(phase), data, state, saver, settings, resume_from if mid_phase else None,
                  progress, deadline)  # fmt: skip
        resume_from = None
        while state.stalled and _retry_stalled(phase, state, model, saver, progress):
            fit_phase(model, state.attempt(phase), data, state, saver, settings, None, progress, deadline)
    state.finished = True
    saver.save(LAST_CHECKPOINT, model, training_state(state, None))
    from kidney_edge.training.diagnostics import run_warnings

    phase_epochs = {phase.name: phase.epochs for phase in config.phases}
    warnings = run_warnings(state.history, phase_epochs, data.val_labels, spec.class_names)
    for warning in warnings:
        log.warning(warning)
        if progress:
            progress(TrainEvent("warning", message=warning))
    if progress:
        progress(TrainEvent("finalize"))
    return _finish(config, state, ctx, [*state.notes, *warnings])


MAX_STALL_RETRIES = 2  # each at a tenth of the previous rate


def _retry_stalled(phase, state: RunState, model, saver: Saver, progress: Progress | None) -> bool:
    """After ``phase`` stalled at chance: set up a retry from best.pt at a tenth of the rate
    (True), or record that the run keeps its best model (False). Either way it says so."""
    attempt = state.attempt(phase)
    epochs_left = attempt.epochs - state.phase_epoch
    classes = model.num_classes
    seen = (
        f"{phase.name} did not learn: training loss stayed at chance (>= {STALL_LOSS_SHARE:g} x ln {classes}"
        f" = {STALL_LOSS_SHARE * math.log(classes):.3f}) for {STALL_EPOCHS} epochs at learning rate {attempt.lr:g}"
    )
    retry = state.retries < MAX_STALL_RETRIES and epochs_left >= STALL_EPOCHS
    if retry:
        note = f"{seen}; retried from the best model at {attempt.lr / 10:g} for the {epochs_left} epochs left"
        state.epochs_lost += state.phase_epoch
        state.lr_scale, state.retries = state.lr_scale / 10, state.retries + 1
        start_from_best(model, phase.name, state, saver)
    else:
        note = (
            f"{seen}; the run keeps its best model, from the {state.best_phase} phase (validation "
            f"macro-F1 {state.best_f1:.3f}): lower --lr-finetune or check the data"
        )
        state.stalled = False
    state.notes.append(note)
    log.warning(note)
    if progress:
        progress(TrainEvent("warning", message=note))
    return retry


def _planned_on_resume(config: TrainConfig) -> TrainConfig:
    """On ``--resume --time-budget``, the epochs planned when the run started (config.json)."""
    import json

    saved = config.out_dir / CONFIG_FILE
    if not (config.resume and config.time_budget_min is not None and saved.is_file()):
        return config
    try:
        epochs = json.loads(saved.read_text())["train_config"]["finetune"]["epochs"]
    except (OSError, ValueError, KeyError):
        return config  # _check_run_folder names the problem
    return dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, epochs=epochs))


def _fit_budget(config: TrainConfig, model, data: PhaseData, rows: list, ctx, progress, started: float):
    """(the config with fine-tuning epochs cut to ``--time-budget``, recorded in config.json; the
    deadline that stops a slowed-down run in time). Under torchrun each rank would time its own
    epochs and could stop at a different one, so only a single-process run gets a deadline."""
    import json

    from kidney_edge.training import budget

    speed = _measure_speed(config, model, data, ctx)
    n_test = sum(1 for row in rows if row.split == "test")
    plan = budget.plan_epochs(config, speed, len(data.train_labels), len(data.val_labels), n_test)
    log.info(plan.describe())
    if plan.over_budget:
        log.warning("--time-budget %.1f min: %s", config.time_budget_min, plan.describe())
    if progress:
        progress(TrainEvent("plan", message=plan.describe()))
    planned = budget.apply_plan(config, plan)
    if ctx.is_main:
        record = json.loads((config.out_dir / CONFIG_FILE).read_text())
        record["train_config"] = planned.to_dict()
        record["time_budget_plan"] = {"description": plan.describe(), **dataclasses.asdict(plan)}
        atomic_write_json(config.out_dir / CONFIG_FILE, record)
    return planned, None if ctx.distributed else budget.Deadline.of(plan, started)


def _measure_speed(config: TrainConfig, model, data: PhaseData, ctx):
    """Seconds per image of a fine-tuning step and of an inference pass, on a few real batches.

    The weights are restored afterwards, so a budgeted run trains exactly as an unbudgeted one
    with the same epochs.
    """
    import copy

    from kidney_edge.training import budget
    from kidney_edge.training.loop import _Augmented, configure_trainable, set_train_mode

    saved = copy.deepcopy(model.state_dict())
    phase = config.finetune
    trainable = configure_trainable(model, phase)
    n = min(config.batch_size, len(data.train_labels))
    train_batch = _Augmented(data.train, data.augment)  # its first n items are timed
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> int:
        set_train_mode(model, trainable, phase.freeze_bn_stats)
        images, labels = zip(*(train_batch[i] for i in range(n)), strict=True)
        loss = loss_fn(model(torch.stack(images).to(ctx.device)), torch.tensor(labels, device=ctx.device))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return n

    def infer() -> int:
        model.eval()
        with torch.no_grad():
            model(torch.stack([data.train[i][0] for i in range(n)]).to(ctx.device))
        return n

    speed = budget.measure_speed(step, infer)
    model.load_state_dict(saved)
    return speed


def _check_run_folder(config: TrainConfig) -> dict[str, Any] | None:
    """Refuse to overwrite a run; with --resume, check the folder and return its last.pt (or None)."""
    run_dir, saved_config = config.out_dir, config.out_dir / CONFIG_FILE
    if not config.resume:
        if saved_config.exists() or (run_dir / LAST_CHECKPOINT).exists():
            raise InputError(
                f"{run_dir} already holds a training run; pass --resume to continue it or choose another --out"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        return None
    if not saved_config.is_file():
        raise InputError(
            f"--resume: {run_dir} holds no training run (no {CONFIG_FILE}); drop --resume to start one"
        )
    _check_compatible(config, saved_config)
    return _load_last(run_dir) if (run_dir / LAST_CHECKPOINT).is_file() else None


def _as_trained(saved: dict[str, Any], key: str) -> Any:
    """A saved config's ``key``, with what its kidney-edge did not write yet filled in as it trained."""
    if key not in saved:
        return BEFORE_FIELD_EXISTED.get(key)
    value = saved[key]
    if key in ("head", "finetune") and isinstance(value, dict):
        return {**PHASE_BEFORE_FIELD_EXISTED, **value}
    return value


def _check_compatible(config: TrainConfig, saved_config: Path) -> None:
    import json

    try:
        saved = json.loads(saved_config.read_text())["train_config"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"--resume: {saved_config} is not a kidney-edge run config ({exc})") from None
    current = config.to_dict()
    changed = [
        f"{key}: {_as_trained(saved, key)!r} -> {current[key]!r}"
        for key in RESUME_FIELDS
        if _as_trained(saved, key) != current[key]
    ]
    if changed:
        raise InputError(
            f"--resume: {config.out_dir} was trained with different options ({'; '.join(changed)}); "
            "rerun with the run's original options or choose another --out"
        )


def _load_last(run_dir: Path) -> dict[str, Any]:
    from kidney_edge.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(run_dir / LAST_CHECKPOINT)
    if "run_state" not in checkpoint:
        raise InputError(f"--resume: {run_dir / LAST_CHECKPOINT} holds no training state")
    return checkpoint


def _splits(config: TrainConfig, ctx: distributed.DistContext) -> list:
    """Rank 0 makes (or, on resume, reuses) RUN/splits.csv; the other ranks read it."""
    from kidney_edge import dataset

    run_csv = config.out_dir / SPLITS_FILE
    if ctx.is_main and not (config.resume and run_csv.is_file()):
        run_data.prepare_splits(config.data_dir, config.splits, config.out_dir, seed=config.seed)
    ctx.barrier()
    return dataset.read_splits(run_csv)


def _make_spec(config: TrainConfig, class_names: tuple[str, ...], rows: list) -> ModelSpec:
    from kidney_edge.backbones import backbone_spec_defaults
    from kidney_edge.dataset import data_fingerprint

    return ModelSpec(
        class_names=class_names,
        arch=config.arch,
        input_size=config.image_size,
        region=config.region,
        data_fingerprint=data_fingerprint(rows),
        **backbone_spec_defaults(config.arch),
    )


def _phase_data(config: TrainConfig, spec: ModelSpec, rows: list) -> PhaseData:
    train_paths, train_labels = run_data.rows_of(rows, "train", spec.class_names)
    val_paths, val_labels = run_data.rows_of(rows, "val", spec.class_names)
    weights = run_data.class_weights(train_labels, spec.num_classes)
    return PhaseData(
        train=run_data.SliceDataset(train_paths, train_labels, spec),
        val=run_data.SliceDataset(val_paths, val_labels, spec),
        train_labels=train_labels,
        val_labels=val_labels,
        class_weights=torch.from_numpy(weights),
        augment=run_data.augmentation(spec, config.augmentation),
    )


def _recorded_config(config: TrainConfig, class_names, data: PhaseData, ctx) -> dict[str, Any]:
    """config.json: the options plus what the run derived from them (class weights, environment)."""
    counts = np.bincount(data.train_labels, minlength=len(class_names))
    return {
        "train_config": config.to_dict(),
        "class_names": list(class_names),
        "train_counts": {name: int(n) for name, n in zip(class_names, counts, strict=True)},
        "class_weights": {
            name: float(w) for name, w in zip(class_names, data.class_weights.tolist(), strict=True)
        },
        "environment": {
            "device": str(ctx.device),
            "world_size": ctx.world_size,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
    }


def _finish(config: TrainConfig, state: RunState, ctx, warnings: list[str]) -> TrainResult:
    """Rank 0 evaluates the best model on the test split (metrics.json, report); all ranks return."""
    best = config.out_dir / BEST_CHECKPOINT
    metrics: dict[str, Any] = {
        "best_val_macro_f1": state.best_f1,
        "best_phase": state.best_phase,
        "best_epoch": state.best_epoch,
        "warnings": warnings,
    }
    if ctx.is_main:
        from kidney_edge.training.finalize import finalize_run

        finished = finalize_run(
            config.out_dir,
            tumor_recall=config.tumor_recall,
            ood_method=config.ood_method,
            ood_max_rejection=config.ood_max_rejection,
            warnings=warnings,
        )
        metrics["test"] = finished.metrics
    ctx.barrier()
    return TrainResult(run_dir=config.out_dir, best_checkpoint=best, metrics=metrics)
