"""Two-phase trainer: what each phase may change, class weights, exact resume, torchrun, bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from kidney_edge import InputError, ModelSpec
from kidney_edge.backbones import create_model
from kidney_edge.training import PhaseConfig, TrainConfig, TrainEvent, train
from kidney_edge.training.data import augmentation, class_weights
from kidney_edge.training.distributed import DistContext
from kidney_edge.training.loop import LoaderSettings, PhaseData, RunState, Saver, fit_phase, lr_schedule

SIZE = 32  # the smallest input the backbone takes: mechanics, not accuracy, are under test


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    values = dict(  # one view at the smallest size: the pair's halves would be 16 px
        data_dir=data, out_dir=out, arch="efficientnet_lite0", image_size=SIZE, batch_size=16, seed=0,
        head=PhaseConfig("head", epochs=2, lr=1e-2),
        finetune=PhaseConfig("finetune", epochs=2, lr=1e-3, unfreeze_blocks=2, augment=True),
    )  # fmt: skip
    values.update(changes)
    return TrainConfig(**values)


# --- one phase at a time, on in-memory tensors --------------------------------------------


def _phase_data(n: int = 12) -> PhaseData:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, SIZE, SIZE, generator=generator)  # (N, 3, 32, 32) normalised
    labels = np.arange(n) % 4
    dataset = TensorDataset(images, torch.from_numpy(labels))
    spec = ModelSpec(input_size=SIZE)
    return PhaseData(dataset, dataset, labels, labels, torch.ones(4), augmentation(spec))


def _run_phase(tmp_path: Path, phase: PhaseConfig) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saver = Saver(tmp_path, ModelSpec(input_size=SIZE), {}, DistContext())
    fit_phase(model, phase, _phase_data(), RunState(phase=phase.name), saver, LoaderSettings(4, 0, 0))
    return before, model.state_dict()


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("cache", [True, False], ids=["cached-features", "augmented"])
def test_head_phase_leaves_backbone_bit_identical(tmp_path: Path, cache: bool) -> None:
    phase = PhaseConfig("head", epochs=2, lr=1e-2, cache_features=cache, augment=not cache)
    assert phase.uses_cached_features is cache
    before, after = _run_phase(tmp_path, phase)
    assert _changed(before, after) == {"classifier.weight", "classifier.bias"}  # BN running stats included
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["run_state"]["phase_epoch"] == 2 and len(saved["run_state"]["history"]) == 2


@pytest.mark.parametrize("freeze_bn_stats", [True, False], ids=["frozen-bn-stats", "batch-bn-stats"])
def test_finetune_phase_changes_only_unfrozen_blocks_and_head(tmp_path: Path, freeze_bn_stats: bool) -> None:
    phase = PhaseConfig(
        "finetune", epochs=1, lr=1e-3, unfreeze_blocks=2, augment=True, freeze_bn_stats=freeze_bn_stats
    )
    before, after = _run_phase(tmp_path, phase)
    changed = _changed(before, after)
    trainable = ("blocks.14.", "blocks.15.", "conv_head.", "classifier.")
    assert changed and all(k.startswith(trainable) for k in changed), changed
    for prefix in trainable:  # every unfrozen module moved
        assert any(k.startswith(prefix) for k in changed), prefix
    statistics = {k for k in changed if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    bn_weights = {k for k in changed if ".bn." in k and k.endswith((".weight", ".bias"))}
    assert bn_weights  # BatchNorm's affine weights train either way
    assert bool(statistics) is not freeze_bn_stats  # running statistics move only when asked


def test_label_smoothing_does_not_reward_predicting_a_heavily_weighted_class() -> None:
    from kidney_edge.training.loop import ClassWeightedCrossEntropy

    weights = torch.tensor([1.0, 0.5, 18.75, 3.0])  # the DICOM series phantom's: Stone is rare
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 1, 3, 1, 2])
    plain = torch.nn.CrossEntropyLoss(weight=weights)(logits, targets)
    assert ClassWeightedCrossEntropy(weights)(logits, targets) == pytest.approx(plain.item(), rel=1e-6)
    uniform = torch.zeros(4, 4, requires_grad=True)  # four Normal slices, no opinion yet
    ClassWeightedCrossEntropy(weights, 0.1)(uniform, torch.ones(4, dtype=torch.long)).backward()
    assert uniform.grad[:, 1].lt(0).all() and uniform.grad[:, [0, 2, 3]].gt(0).all()  # towards Normal only
    torch_formula = torch.zeros(4, 4, requires_grad=True)
    torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1)(
        torch_formula, torch.ones(4, dtype=torch.long)
    ).backward()
    assert torch_formula.grad[:, 2].lt(0).all()  # what it replaces: pulled towards Stone


def test_weight_average_is_what_validation_and_best_pt_see(tmp_path: Path) -> None:
    """--ema: best.pt holds the moving average of the trained weights at the best epoch; last.pt
    holds the trained weights and the average's state, so a resumed run continues both."""
    decay, steps_per_epoch = 0.5, 3  # 12 images in batches of 4
    phase = PhaseConfig("finetune", epochs=2, lr=1e-2, unfreeze_blocks=1, augment=True, ema_decay=decay)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=4)
    trained: list[torch.Tensor] = []

    def record(event: TrainEvent) -> None:
        if event.kind == "step":
            trained.append(model.classifier.weight.detach().clone())

    state = RunState(phase=phase.name)
    saver = Saver(tmp_path, ModelSpec(input_size=SIZE), {}, DistContext())
    fit_phase(model, phase, _phase_data(), state, saver, LoaderSettings(4, 0, 0), progress=record)
    averages = [trained[0]]  # the first update copies the weights
    for weights in trained[1:]:
        averages.append(decay * averages[-1] + (1 - decay) * weights)
    assert len(trained) == 2 * steps_per_epoch
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    expected_best = averages[best["epoch"] * steps_per_epoch - 1]
    assert torch.allclose(best["model_state"]["classifier.weight"], expected_best, atol=1e-6)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert torch.equal(last["model_state"]["classifier.weight"], trained[-1])
    assert torch.allclose(last["weight_average"]["module.classifier.weight"], averages[-1], atol=1e-6)
    assert not torch.allclose(averages[-1], trained[-1])

    def crash_in_second_epoch(event: TrainEvent) -> None:
        if event.kind == "step" and event.epoch == 2:
            raise _Crash

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=4)
    saver = Saver(crashed, ModelSpec(input_size=SIZE), {}, DistContext())
    with pytest.raises(_Crash):
        fit_phase(model, phase, _phase_data(), RunState(phase=phase.name), saver, LoaderSettings(4, 0, 0),
                  progress=crash_in_second_epoch)  # fmt: skip
    resume = torch.load(crashed / "last.pt", weights_only=True)
    model.load_state_dict(resume["model_state"])
    fit_phase(model, phase, _phase_data(), RunState.from_dict(resume["run_state"]), saver,
              LoaderSettings(4, 0, 0), resume)  # fmt: skip
    resumed = torch.load(crashed / "last.pt", weights_only=True)["weight_average"]
    assert torch.equal(
        resumed["module.classifier.weight"], last["weight_average"]["module.classifier.weight"]
    )


@pytest.mark.parametrize(
    ("finetune_f1", "stopped_after"),
    [((0.50, 0.60, 0.70, 0.80), None), ((0.50, 0.40, 0.45, 0.80), 3)],
    ids=["climbing-below-head-best", "stalled"],
)
def test_early_stopping_counts_from_the_phase_best(
    tmp_path: Path, finetune_f1: tuple[float, ...], stopped_after: int | None
) -> None:
    """Fine-tuning that starts below the head's best but keeps improving is not stopped."""
    from kidney_edge.training.loop import _end_epoch

    saver = Saver(tmp_path, ModelSpec(input_size=SIZE), {}, DistContext())
    model, state = torch.nn.Linear(2, 4), RunState(phase="head")
    _end_epoch(model, PhaseConfig("head", 1, 1e-3), 1, {"val_macro_f1": 0.9, "train_loss": 0.5}, state, saver,
               None, 4)  # fmt: skip
    state.enter_phase("finetune")
    phase = PhaseConfig("finetune", epochs=4, lr=1e-4, unfreeze_blocks=1, patience=2)
    stop = None
    for epoch, f1 in enumerate(finetune_f1, start=1):
        _end_epoch(model, phase, epoch, {"val_macro_f1": f1, "train_loss": 0.5}, state, saver, None, 4)
        if state.phase_done and stop is None:
            stop = epoch
    assert stop == (stopped_after or 4)
    assert (state.best_phase, state.best_f1) == ("head", 0.9)  # best.pt stays the head's


def test_distributed_shards_partition_one_shuffle() -> None:
    from kidney_edge.training.loop import make_loader

    dataset = TensorDataset(torch.arange(20).float(), torch.zeros(20, dtype=torch.long))
    shards = []
    for rank in (0, 1):
        ctx = DistContext(rank=rank, world_size=2)
        loader = make_loader(dataset, LoaderSettings(4, 0, 0), ctx, shuffle_seed=7)
        shards.append([int(v) for batch, _ in loader for v in batch])
    assert sorted(shards[0] + shards[1]) == list(range(20))  # every image once per epoch
    assert shards[0] != sorted(shards[0])  # shuffled


def test_class_weights_match_hand_computation() -> None:
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])  # 10 images, 3 classes
    # "balanced": n / (n_classes * count_c) = 10/18, 10/9, 10/3
    assert class_weights(labels, 3) == pytest.approx([10 / 18, 10 / 9, 10 / 3])


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    factor = lr_schedule(100, 0.1)
    assert [factor(0), factor(9), factor(10)] == pytest.approx([0.1, 1.0, 1.0])
    assert factor(55) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"arch": "resnet50"}, "--arch"),
        ({"image_size": 100}, "--image-size"),
        ({"batch_size": 1}, "--batch-size"),
        ({"device": "tpu"}, "--device"),
        ({"tumor_recall": 1.5}, "--tumor-recall"),
    ],
)
def test_config_errors_name_the_flag(tmp_path: Path, changes: dict, flag: str) -> None:
    with pytest.raises(InputError, match=flag):
        tiny_config(tmp_path, tmp_path / "run", **changes)


def test_phase_config_errors_name_the_flag() -> None:
    with pytest.raises(InputError, match="--lr-finetune"):
        PhaseConfig("finetune", epochs=1, lr=0.0)
    with pytest.raises(InputError, match="--epochs-head"):
        PhaseConfig("head", epochs=-1, lr=1e-3)


# --- whole runs on the phantom set ----------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    events: list[TrainEvent] = []
    result = train(tiny_config(phantom_dir, out), progress=events.append)
    assert result.best_checkpoint == out / "best.pt"
    kinds = [e.kind for e in events if e.kind not in ("step", "warning")]
    assert kinds == ["phase", "epoch", "epoch", "phase", "epoch", "epoch", "finalize"]
    # Warnings come before the test evaluation and are recorded in metrics.json and the report.
    warnings = [e.message for e in events if e.kind == "warning"]
    assert [e.kind for e in events][-1 - len(warnings) : -1] == ["warning"] * len(warnings)
    recorded = json.loads((out / "metrics.json").read_text())["warnings"]
    assert recorded == warnings and any("fewer than 10 validation images" in w for w in warnings)
    return out


def test_run_folder_holds_the_contracted_artifacts(straight_run: Path) -> None:
    from kidney_edge.dataset import data_fingerprint, read_splits

    for name in (
        "best.pt",
        "last.pt",
        "spec.json",
        "config.json",
        "history.csv",
        "splits.csv",
        "metrics.json",
    ):
        assert (straight_run / name).is_file(), name
    with open(straight_run / "history.csv") as handle:
        history = list(csv.DictReader(handle))
    assert [(row["phase"], row["epoch"]) for row in history] == [
        ("head", "1"), ("head", "2"), ("finetune", "1"), ("finetune", "2")
    ]  # fmt: skip
    rows = read_splits(straight_run / "splits.csv")
    spec = ModelSpec.from_json((straight_run / "spec.json").read_text())
    assert spec.data_fingerprint == data_fingerprint(rows)
    assert spec.class_names == ("Cyst", "Normal", "Stone", "Tumor") and spec.input_size == SIZE
    metrics = json.loads((straight_run / "metrics.json").read_text())
    assert {"argmax", "rule", "headline", "labels", "positive_class"} <= set(metrics)
    for block in ("argmax", "rule"):
        assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(metrics[block])


def test_class_weights_are_recorded_from_training_labels(straight_run: Path) -> None:
    from kidney_edge.dataset import read_splits

    recorded = json.loads((straight_run / "config.json").read_text())
    train_labels = [row.label for row in read_splits(straight_run / "splits.csv") if row.split == "train"]
    names = recorded["class_names"]
    counts = [train_labels.count(name) for name in names]
    expected = [len(train_labels) / (len(names) * c) for c in counts]
    assert [recorded["class_weights"][n] for n in names] == pytest.approx(expected)
    assert recorded["train_counts"] == dict(zip(names, counts, strict=True))


def test_best_checkpoint_is_plain_data_and_loads(straight_run: Path) -> None:
    from kidney_edge.checkpoint import load_model

    raw = torch.load(straight_run / "best.pt", weights_only=True)
    history = list(csv.DictReader(open(straight_run / "history.csv")))
    best = max(history, key=lambda row: float(row["val_macro_f1"]))
    assert raw["val_macro_f1"] == pytest.approx(float(best["val_macro_f1"]))
    model, spec = load_model(straight_run / "best.pt")
    assert spec.temperature > 0 and model(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 4)


class _Crash(Exception):
    pass


def _crash_at(phase: str, epoch: int):
    def progress(event: TrainEvent) -> None:
        # Dies inside an epoch, after the previous epoch's last.pt: what kill -9 leaves behind.
        if event.kind == "step" and event.phase == phase and event.epoch == epoch:
            raise _Crash

    return progress


def test_resume_after_crashes_matches_straight_run(straight_run: Path, tmp_path: Path, monkeypatch) -> None:
    import kidney_edge.training.finalize

    # Test metrics do not touch the weights; skipping them here keeps the test in seconds.
    monkeypatch.setattr(kidney_edge.training.finalize, "finalize_run", lambda run_dir, **kw: _NoMetrics)
    config = tiny_config(Path(json.loads((straight_run / "config.json").read_text())["train_config"]["data_dir"]),
                         tmp_path / "run")  # fmt: skip
    with pytest.raises(_Crash):
        train(config, progress=_crash_at("head", 2))
    resumed = TrainConfig(**{**config.__dict__, "resume": True})
    with pytest.raises(_Crash):
        train(resumed, progress=_crash_at("finetune", 2))
    train(resumed)
    for name in ("last.pt", "best.pt"):
        expected = torch.load(straight_run / name, weights_only=True)["model_state"]
        actual = torch.load(tmp_path / "run" / name, weights_only=True)["model_state"]
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name
    history = [row for row in csv.DictReader(open(tmp_path / "run" / "history.csv"))]
    straight = [row for row in csv.DictReader(open(straight_run / "history.csv"))]
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in history] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight
    ]


class _NoMetrics:
    metrics: dict = {}


# --- bad input through the CLI ---------------------------------------------------------------


def _cli(*args: str):
    from kidney_edge.cli import app

    return CliRunner().invoke(app, ["train", *map(str, args)])


def _class_folder(root: Path, source: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for image in sorted((source / name).glob("*.jpg"))[:count]:
            shutil.copy(image, root / name / image.name)
    return root


def test_bad_inputs_get_clear_messages(phantom_dir: Path, straight_run: Path, tmp_path: Path) -> None:
    cases = [
        ((tmp_path / "nowhere", "--out", tmp_path / "r1"), "nowhere"),
        ((_class_folder(tmp_path / "one", phantom_dir, {"Cyst": 12}), "--out", tmp_path / "r2"), "2 classes"),
        ((_class_folder(tmp_path / "few", phantom_dir, {"Cyst": 12, "Normal": 12, "Stone": 2}), "--out",
          tmp_path / "r3"), "Stone"),
        ((phantom_dir, "--out", straight_run), "--resume"),
        ((phantom_dir, "--out", straight_run, "--resume", "--image-size", "64"), "image_size"),
        ((phantom_dir, "--out", tmp_path / "empty", "--resume"), "no training run"),
        ((phantom_dir, "--out", tmp_path / "r4", "--arch", "resnet50"), "resnet50"),
        ((phantom_dir, "--out", tmp_path / "r5", "--weights", tmp_path / "none.pth"), "none.pth"),
        ((phantom_dir, "--out", tmp_path / "r7", "--ema", "1.5"), "--ema must be in (0, 1)"),
        ((phantom_dir, "--out", tmp_path / "r8", "--drop-path", "1.5"), "--drop-path must be in [0, 1)"),
        ((phantom_dir, "--out", tmp_path / "r9", "--weight-decay", "-1"), "--weight-decay must be in [0, 1)"),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append(((phantom_dir, "--out", tmp_path / "r6", "--device", "cuda"), "--device cuda"))
    for args, message in cases:
        result = _cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output.replace("\n", " "), (args, result.output)
    assert not (tmp_path / "r5").exists()  # refused before writing anything


# --- torchrun ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(phantom_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "kidney_edge", "train", str(phantom_dir), "--out", str(out), "--device", "cpu",
        "--image-size", "64", "--batch-size", "8", "--epochs-head", "2", "--epochs-finetune", "1",
        "--unfreeze-blocks", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["environment"]["world_size"] == 2
    assert len(list(csv.DictReader(open(out / "history.csv")))) == 3
    assert (out / "metrics.json").is_file() and (out / "best.pt").is_file()
    assert not list(out.glob(".*.tmp"))


# --- honest warnings and the time budget ------------------------------------------------------


def _history(phase: str, scores: list[float]) -> list[dict]:
    return [{"phase": phase, "epoch": i + 1, "val_macro_f1": f1} for i, f1 in enumerate(scores)]


def test_warnings_for_a_climbing_phase_a_small_class_and_a_head_near_chance() -> None:
    from kidney_edge.training.diagnostics import run_warnings

    names = ("Cyst", "Normal", "Stone", "Tumor")
    val = np.repeat(np.arange(4), [12, 12, 9, 12])  # Stone has 9 validation images
    history = _history("head", [0.20, 0.30, 0.33]) + _history("finetune", [0.5, 0.7, 0.8, 0.9])
    warnings = run_warnings(history, {"head": 3, "finetune": 4}, val, names)
    assert len(warnings) == 4
    assert "still rising at the last head epoch (0.300 -> 0.330)" in warnings[0]
    assert "still rising at the last finetune epoch (0.800 -> 0.900)" in warnings[1]
    assert "(Stone 9)" in warnings[2]
    assert "near chance, < 0.375" in warnings[3]
    # A plateau, a phase stopped early, enough images and a head above chance: no warning.
    calm = _history("head", [0.5, 0.6, 0.6]) + _history("finetune", [0.7, 0.9, 0.8])
    balanced = np.repeat(np.arange(4), 10)
    assert run_warnings(calm, {"head": 3, "finetune": 4}, balanced, names) == []


def test_warning_for_a_run_that_memorised_its_training_images() -> None:
    from kidney_edge.training.diagnostics import run_warnings

    names = ("Cyst", "Normal", "Stone", "Tumor")
    balanced = np.repeat(np.arange(4), 10)

    def run(head: list[float], finetune: list[float], last_train_accuracy: float) -> list[dict]:
        history = _history("head", head) + _history("finetune", finetune)
        for row in history:
            row["train_accuracy"] = 0.5
        history[-1]["train_accuracy"] = last_train_accuracy
        return history

    # The look-alike failure: 99% of the training images fitted, validation at most 0.48.
    memorised = run_warnings(run([0.28, 0.33], [0.41, 0.48, 0.42], 0.99), {"head": 9, "finetune": 9}, balanced, names)
    assert len(memorised) == 1  # it replaces the head's "more fine-tuning" advice
    assert "best validation macro-F1 is 0.480 (chance is 0.250; below 0.500" in memorised[0]
    assert "it fits 99% of its training images: it memorised them" in memorised[0]
    assert "will not help" in memorised[0] and "docs/training.md#" in memorised[0]
    # Not fitted either: not learned, without the memorising clause.
    unfitted = run_warnings(run([0.28], [0.30, 0.31], 0.60), {"head": 9, "finetune": 9}, balanced, names)
    assert len(unfitted) == 1 and "best validation macro-F1 is 0.310" in unfitted[0]
    assert "memorised" not in unfitted[0]
    # Learned (validation at the threshold): no such warning.
    assert run_warnings(run([0.6], [0.7, 0.5], 0.99), {"head": 9, "finetune": 9}, balanced, names) == []
    # Two classes: chance 0.5, learned from 0.667.
    two = run_warnings(run([0.6], [0.66], 0.95), {"head": 9, "finetune": 9}, np.repeat([0, 1], 10), ("a", "b"))
    assert len(two) == 1 and "below 0.667" in two[0]


def test_resume_of_a_run_saved_before_the_region_rule_needs_the_whole_slice(tmp_path: Path) -> None:
    import json

    from kidney_edge.training.trainer import _check_compatible

    config = tiny_config(tmp_path, tmp_path / "run")
    saved = config.to_dict()
    del saved["region"]  # written before the field existed: that run saw the whole slice
    saved_config = tmp_path / "config.json"
    saved_config.write_text(json.dumps({"train_config": saved}))
    assert config.region == "kidneys"  # today's default
    with pytest.raises(InputError, match="region: 'whole' -> 'kidneys'"):
        _check_compatible(config, saved_config)
    _check_compatible(dataclasses.replace(config, region="whole"), saved_config)  # resumes as it trained


def test_clip_grad_norm_bounds_every_step_and_is_checked() -> None:
    from torch import nn

    from kidney_edge.training.config import default_finetune_phase
    from kidney_edge.training.loop import Optimization, train_one_epoch

    def grad_norm_after_epoch(clip: float | None) -> float:
        torch.manual_seed(0)
        net = nn.Linear(8, 4)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        opt = Optimization(net, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), nn.CrossEntropyLoss())
        batches = [(100 * torch.randn(4, 8), torch.tensor([0, 1, 2, 3])) for _ in range(3)]  # large inputs, large grads
        train_one_epoch(opt, batches, torch.device("cpu"), lambda step: None, clip_grad_norm=clip)
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()])))

    assert grad_norm_after_epoch(None) > 10  # the last step's gradients, left in place by the step
    assert grad_norm_after_epoch(0.5) == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(InputError, match="--clip-grad"):
        dataclasses.replace(default_finetune_phase(), clip_grad_norm=0.0)


def test_time_budget_cuts_finetune_epochs_to_fit(tmp_path: Path) -> None:
    from kidney_edge.training.budget import FIXED_OVERHEAD_S, Speed, apply_plan, plan_epochs

    config = tiny_config(tmp_path, tmp_path / "run", time_budget_min=10.0)
    config = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, epochs=12))
    speed = Speed(finetune_s=0.1, frozen_s=0.02)  # 10 images/s fine-tuning, 50 inference
    plan = plan_epochs(config, speed, n_train=560, n_val=120, n_test=120)
    # fixed: 30 + (560 + 120) * 0.02 + (120 + 120) * 0.02 = 48.4 s; per epoch 56 + 2.4 = 58.4 s
    fixed, per_epoch = FIXED_OVERHEAD_S + 680 * 0.02 + 240 * 0.02, 560 * 0.1 + 120 * 0.02
    assert plan.finetune_epochs == int((600 - fixed) // per_epoch) == 9
    assert plan.estimated_s == pytest.approx(fixed + 9 * per_epoch) and plan.estimated_s <= 600
    assert apply_plan(config, plan).finetune.epochs == 9 and apply_plan(config, plan).head == config.head
    assert "9 fine-tuning epochs" in plan.describe() and "10.0 images/s fine-tuning" in plan.describe()
    roomy = dataclasses.replace(config, time_budget_min=600.0)
    assert plan_epochs(roomy, speed, 560, 120, 120).finetune_epochs == 12  # never more than configured
    tight = plan_epochs(dataclasses.replace(config, time_budget_min=0.5), speed, 560, 120, 120)
    assert tight.finetune_epochs == 1 and tight.over_budget and "over budget" in tight.describe()
    assert not plan.over_budget
    with pytest.raises(InputError, match="--time-budget"):
        tiny_config(tmp_path, tmp_path / "run", time_budget_min=0.0)


def test_budget_deadline_leaves_time_for_the_end_of_the_run() -> None:
    from kidney_edge.training.budget import FIXED_OVERHEAD_S, Deadline, Speed, plan_epochs

    config = tiny_config(Path("."), Path("run"), time_budget_min=10.0)
    plan = plan_epochs(config, Speed(finetune_s=0.05, frozen_s=0.01), 560, 120, 120)
    assert plan.end_s == pytest.approx(FIXED_OVERHEAD_S + 240 * 0.01)  # calibration + test + overhead
    deadline = Deadline.of(plan, started=1000.0)
    assert deadline.at == pytest.approx(1000.0 + 600.0 - plan.end_s)
    assert deadline.next_epoch_fits(30.0, now=deadline.at - 30.0)  # ends exactly on time
    assert not deadline.next_epoch_fits(30.0, now=deadline.at - 29.0)
    note = deadline.stop_note("finetune", 3, 12, 41.6)
    assert "fine-tuning stopped after epoch 3 of 12" in note and "(42 s)" in note and "10.0 min" in note
    assert deadline.stop_note("head", 1, 15, 0.1).startswith("time budget 10.0 min: the head phase stopped")


def test_a_run_that_slows_down_stops_at_its_budget_and_says_so(
    phantom_dir: Path, straight_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epochs that run slower than the start-of-run measurement (other jobs on the cores) must not
    carry a budgeted run past its budget: the next epoch is not started, the best model is kept."""
    from kidney_edge.training import budget

    monkeypatch.setattr(budget.Deadline, "next_epoch_fits", lambda self, last_epoch_s, now=None: False)
    out = tmp_path / "slow"
    events: list[TrainEvent] = []
    train(tiny_config(phantom_dir, out, splits=straight_run / "splits.csv", time_budget_min=600.0),
          progress=events.append)  # fmt: skip
    history = list(csv.DictReader(open(out / "history.csv")))
    assert [(row["phase"], row["epoch"]) for row in history] == [("head", "1"), ("finetune", "1")]
    assert json.loads((out / "config.json").read_text())["time_budget_plan"]["finetune_epochs"] == 2
    notes = [e.message for e in events if e.kind == "warning" and "time budget" in e.message]
    assert [n.split(", because")[0] for n in notes] == [
        "time budget 600.0 min: the head phase stopped after epoch 1 of 2",  # each phase's first epoch runs
        "time budget 600.0 min: fine-tuning stopped after epoch 1 of 2",
    ]
    warnings = json.loads((out / "metrics.json").read_text())["warnings"]
    assert any("fine-tuning stopped after epoch 1 of 2" in w for w in warnings)
    assert (out / "best.pt").is_file()


def test_layer_decay_groups_and_whole_backbone_unfreezing() -> None:
    from kidney_edge.backbones import create_model
    from kidney_edge.training.config import ALL_BLOCKS
    from kidney_edge.training.loop import configure_trainable, parameter_groups

    model = create_model("efficientnet_lite0", num_classes=4, pretrained=False)
    phase = PhaseConfig("finetune", epochs=1, lr=1e-3, unfreeze_blocks=3, layer_decay=0.5)
    configure_trainable(model, phase)
    groups = parameter_groups(model, phase)
    # classifier, conv_head, then the last three blocks from the head down
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4])
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in model.blocks[-1].parameters()}
    whole = dataclasses.replace(phase, unfreeze_blocks=ALL_BLOCKS, layer_decay=1.0)
    configure_trainable(model, whole)
    assert all(p.requires_grad for p in model.parameters())
    grouped = {id(p) for g in parameter_groups(model, whole) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters()}


def test_train_with_a_time_budget_records_its_plan_and_weights_are_untouched(
    phantom_dir: Path, straight_run: Path, tmp_path: Path
) -> None:
    """Measuring speed on real batches must not change training: same epochs, same weights."""
    out = tmp_path / "budget"
    events: list[TrainEvent] = []
    train(tiny_config(phantom_dir, out, splits=straight_run / "splits.csv", time_budget_min=600.0),
          progress=events.append)  # fmt: skip
    plan = [e.message for e in events if e.kind == "plan"]
    assert len(plan) == 1 and "2 head + 2 fine-tuning epochs" in plan[0]
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["time_budget_plan"]["finetune_epochs"] == 2
    assert recorded["time_budget_plan"]["speed"]["finetune_s"] > 0
    budgeted = torch.load(out / "best.pt", weights_only=True)["model_state"]
    straight = torch.load(straight_run / "best.pt", weights_only=True)["model_state"]
    assert all(torch.equal(budgeted[k], straight[k]) for k in straight)


def test_train_out_defaults_to_a_new_run_folder_under_models(tmp_path: Path, monkeypatch) -> None:
    import re

    from kidney_edge.cli import app
    from kidney_edge.training import TrainResult, trainer
    from kidney_edge.training.config import resolve_run_dir

    started: list[TrainConfig] = []

    def record(config: TrainConfig, progress=None) -> TrainResult:  # the CLI's wiring, not training
        started.append(config)
        metrics = {"best_phase": "head", "best_epoch": 1, "best_val_macro_f1": 0.5}
        return TrainResult(config.out_dir, config.out_dir / "best.pt", metrics)

    monkeypatch.setattr(trainer, "train", record)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "kidney-ct"
    data.mkdir()
    result = CliRunner().invoke(app, ["train", str(data), "--no-pretrained"])
    assert result.exit_code == 0, result.output
    (config,) = started
    assert config.out_dir.parent == Path("models")  # models/README.md: runs land in models/<run>/
    assert re.fullmatch(r"kidney-ct-\d{8}-\d{6}", config.out_dir.name), config.out_dir
    assert resolve_run_dir(data, tmp_path / "mine") == tmp_path / "mine"  # --out wins
    resumed = CliRunner().invoke(app, ["train", str(data), "--resume"])
    assert resumed.exit_code == 2 and "pass its folder as --out" in resumed.output
    assert len(started) == 1


def test_stall_rule_is_loss_at_chance_for_three_epochs() -> None:
    from kidney_edge.training.loop import stalled_at_chance

    ln4 = float(np.log(4))
    assert stalled_at_chance([ln4, ln4 * 1.01, float("nan")], 4)  # chance, above it, diverged
    assert stalled_at_chance([0.5, ln4, ln4, ln4], 4)  # the last three epochs decide
    assert not stalled_at_chance([ln4, ln4], 4)  # too early to tell
    assert not stalled_at_chance([ln4, ln4, 0.96 * ln4], 4)  # one epoch below 97% of ln C: learning
    assert not stalled_at_chance([1.2, 1.0, 0.8], 4)


def test_a_planted_collapse_is_retried_at_a_lower_rate_and_reported(phantom_dir: Path, tmp_path: Path) -> None:
    # An absurd fine-tuning rate (0.9 with AdamW) blows the loss up: the run must notice that
    # fine-tuning is not learning, retry at a tenth of the rate, and say so in metrics.json.
    events: list[TrainEvent] = []
    config = tiny_config(
        phantom_dir, tmp_path / "run",
        head=PhaseConfig("head", epochs=1, lr=1e-2),
        finetune=PhaseConfig("finetune", epochs=6, lr=0.9, unfreeze_blocks=2, augment=False, patience=6),
    )  # fmt: skip
    train(config, progress=events.append)
    history = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    finetune = [row for row in history if row["phase"] == "finetune"]
    assert all(float(row["train_loss"]) >= 0.97 * np.log(4) for row in finetune[:3])
    assert [row["epoch"] for row in finetune][:4] == ["1", "2", "3", "1"]  # the retry starts over
    assert max(float(row["lr"]) for row in finetune[3:]) <= 0.09 + 1e-9
    notes = [e.message for e in events if e.kind == "warning" and "did not learn" in e.message]
    assert notes and "retried from the best model at 0.09 for the 3 epochs left" in notes[0]
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["warnings"]
    assert notes[0] in recorded


def test_mixup_blends_pairs_and_keeps_both_labels() -> None:
    from kidney_edge.training.loop import mixup

    images, labels = torch.arange(8.0).view(4, 2), torch.arange(4)
    assert mixup(images, labels, 0.0)[2] == 1.0  # off: unchanged
    torch.manual_seed(0)
    np.random.seed(0)
    mixed, partners, share = mixup(images, labels, 0.4)
    assert 0.0 < share < 1.0 and sorted(partners.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed, share * images + (1 - share) * images[partners])


def test_resume_of_a_run_saved_before_gradient_clipping_compares_its_phases_as_trained(tmp_path: Path) -> None:
    import json

    from kidney_edge.training.trainer import _check_compatible

    config = tiny_config(tmp_path, tmp_path / "run")
    saved = config.to_dict()
    for phase in ("head", "finetune"):
        del saved[phase]["clip_grad_norm"]  # written before the field existed: that run did not clip
    saved_config = tmp_path / "config.json"
    saved_config.write_text(json.dumps({"train_config": saved}))
    _check_compatible(config, saved_config)  # resumes as it trained
    clipped = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, clip_grad_norm=1.0))
    with pytest.raises(InputError, match="finetune: .*'clip_grad_norm': None"):
        _check_compatible(clipped, saved_config)


def test_a_pair_run_trains_and_records_its_arch_and_stretched_view(phantom_dir: Path, tmp_path: Path) -> None:
    from kidney_edge.checkpoint import load_model
    from kidney_edge.spec import ResizeRule

    out = tmp_path / "pair"
    result = train(tiny_config(phantom_dir, out, arch="efficientnet_lite0_pair", image_size=64))
    model, spec = load_model(result.best_checkpoint)
    assert spec.arch == "efficientnet_lite0_pair" and spec.resize is ResizeRule.STRETCH  # the arch's view
    assert ModelSpec.from_json((out / "spec.json").read_text()) == spec
    assert model.classifier.in_features == 2 * 1280  # the head reads [mean, |difference|] of the halves
    history = [row for row in csv.DictReader((out / "history.csv").open()) if row["phase"] == "finetune"]
    assert len(history) == 2 and all(float(row["train_loss"]) > 0 for row in history)


def test_the_input_size_defaults_to_the_archs_own(tmp_path: Path) -> None:
    def config(**changes) -> TrainConfig:
        return TrainConfig(data_dir=tmp_path, out_dir=tmp_path / "run", **changes)

    assert (config().arch, config().image_size) == ("efficientnet_lite0_pair", 448)  # each kidney at 224 px
    assert config(arch="efficientnet_lite0").image_size == 224
    assert config(image_size=160).image_size == 160  # an explicit size wins
    assert config().to_dict()["image_size"] == 448  # the run records the size it trained at
