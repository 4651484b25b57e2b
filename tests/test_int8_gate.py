"""The INT8 evidence gate and the repair loop, on tiny ONNX models (no torch).

The blocks model (tests/_factories.py) puts its four gray levels mid-way inside its classes, so a
faithful INT8 copy agrees with fp32 on every image; a corrupted quantization scale or a planted
outlier channel in one block makes it disagree on about half of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from _factories import BLOCK_CENTRES, make_blocks_onnx, write_band_images

from kidney_edge.errors import InputError
from kidney_edge.int8_gate import (
    Int8Gate,
    Int8GateConfig,
    gate_images,
    judge,
    paired_bootstrap,
    resampled_scores,
)
from kidney_edge.metrics import macro_f1
from kidney_edge.runtime.precision import ProbeResult
from kidney_edge.spec import ModelSpec

onnx = pytest.importorskip("onnx")

MINMAX = {"calibrate_method": "minmax", "fp32_layers": ()}


@pytest.fixture(scope="module")
def bands(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    return write_band_images(tmp_path_factory.mktemp("bands"), 12)  # 48 images, 12 per class


def _quantized(tmp_path: Path, paths: list[Path], planted: int | None = None) -> tuple[Path, Path]:
    from kidney_edge.quantize import QuantizationConfig, quantize_model

    fp32 = make_blocks_onnx(tmp_path / f"model-{planted}.onnx", planted=planted)
    int8 = tmp_path / f"model-{planted}.int8.onnx"
    quantize_model(fp32, int8, paths, ModelSpec(input_size=32), QuantizationConfig(**MINMAX))
    return fp32, int8


def _corrupt_a_scale(source: Path, target: Path) -> str:
    """Triple the scale of one activation's DequantizeLinear, not its QuantizeLinear's (a quantizer
    bug): returns the node's name."""
    from onnx import numpy_helper

    model = onnx.load(str(source))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("x2"))
    scale = numpy_helper.to_array(initializers[node.input[1]]) * 3.0
    model.graph.initializer.append(numpy_helper.from_array(scale, "corrupted_scale"))
    node.input[1] = "corrupted_scale"
    onnx.save(model, str(target))
    return node.name


@pytest.mark.parametrize("n_test", [2, 40])
def test_gate_passes_faithful_int8_and_fails_a_corrupted_scale_whatever_the_test_split(
    bands, tmp_path: Path, n_test: int
) -> None:
    paths, labels = bands
    fp32, int8 = _quantized(tmp_path, paths)
    broken = tmp_path / "broken.int8.onnx"
    _corrupt_a_scale(int8, broken)
    order = np.random.default_rng(0).permutation(len(paths))  # a test split of any size, all classes mixed
    test = [paths[i] for i in order[:n_test]]
    images = gate_images(test, labels[order[:n_test]], paths, max_images=1000, seed=0)
    assert len(images.paths) == len(paths) == images.available and images.n_labelled == n_test
    gate = Int8Gate(fp32, images, Int8GateConfig(resamples=500))

    faithful = gate(int8)
    assert faithful["passed"] and faithful["failures"] == []
    assert faithful["agreement"]["argmax"] == faithful["agreement"]["rule"] == 1.0
    assert 0 < faithful["agreement"]["max_abs_diff_probabilities"] < 0.05
    assert faithful["labelled"]["argmax"]["macro_f1"]["delta_ci"] == [0.0, 0.0]
    assert faithful["deciding"].startswith(f"INT8 gate passed ({len(paths)} images, {n_test} labelled)")

    unfaithful = gate(broken)
    assert not unfaithful["passed"]
    assert unfaithful["agreement"]["argmax"] <= 0.80
    assert unfaithful["deciding"].startswith("INT8 gate FAILED")
    assert any(f.startswith("argmax agreement with fp32") for f in unfaithful["failures"])
    assert any(f.startswith("rule agreement with fp32") for f in unfaithful["failures"])


def test_bootstrap_scores_match_the_metrics_and_the_ci_is_paired() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 60)
    fp32 = np.where(rng.random(60) < 0.8, y, rng.integers(0, 4, 60))
    whole = np.arange(60)[None, :]
    scores = resampled_scores(y, fp32, whole, 4, positive=3)
    assert scores["macro_f1"][0] == pytest.approx(macro_f1(y, fp32, 4))
    assert scores["positive_recall"][0] == pytest.approx(np.mean(fp32[y == 3] == 3))
    assert scores["accuracy"][0] == pytest.approx(np.mean(fp32 == y))

    config = Int8GateConfig(resamples=400, seed=3)
    same = paired_bootstrap(y, fp32, fp32.copy(), 4, 3, config)
    assert same["macro_f1"]["delta_ci"] == [0.0, 0.0] and same["macro_f1"]["drop_upper"] == 0.0
    int8 = fp32.copy()
    flipped = np.flatnonzero(fp32 == y)[:6]  # six right answers made wrong: a 10-point accuracy drop
    int8[flipped] = (y[flipped] + 1) % 4
    worse = paired_bootstrap(y, fp32, int8, 4, 3, config)
    assert worse["accuracy"]["delta"] == pytest.approx(-0.1)
    low, high = worse["accuracy"]["delta_ci"]
    assert low < -0.1 < high <= 0.0 and worse["accuracy"]["drop_upper"] == -low
    assert worse["accuracy"]["drop_lower"] == max(0.0, -high)
    assert paired_bootstrap(y, fp32, int8, 4, 3, config) == worse  # seeded: the same figures every time


def test_deciding_criterion_is_the_one_nearest_its_limit() -> None:
    spec = ModelSpec(input_size=32)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) * 5
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = probabilities.argmax(1)
    images = gate_images([Path(f"/x/{i}.png") for i in range(200)], labels, [], 1000, 0)
    int8 = probabilities.copy()
    int8[0] = np.roll(int8[0], 1)  # one decision of 200 changes: 99.5% agreement
    record = judge((logits, probabilities), (logits, int8), images, spec, Int8GateConfig(resamples=200))
    assert record["agreement"]["argmax"] == 0.995
    names = {c["name"]: c for c in record["criteria"]}
    assert names["argmax agreement"]["margin"] == pytest.approx(0.005)
    deciding = min(record["criteria"], key=lambda c: c["margin"])
    assert record["deciding"].endswith(deciding["text"])
    strict = judge((logits, probabilities), (logits, int8), images, spec, Int8GateConfig(min_agreement=0.999, resamples=200))
    assert not strict["passed"] and strict["failures"][0].startswith("argmax agreement with fp32 99.50%")


def test_gate_images_are_deduplicated_capped_and_deterministic() -> None:
    test = [Path(f"/d/test/{i}.png") for i in range(5)]
    others = [Path(f"/d/train/{i}.png") for i in range(50)] + test[:2]  # a test image listed again
    whole = gate_images(test, np.arange(5), others, 1000, seed=0)
    assert whole.available == 55 and len(whole.paths) == 55 and whole.paths[:5] == test
    capped = gate_images(test, np.arange(5), others, 20, seed=0)
    assert len(capped.paths) == 20 and capped.paths[:5] == test and capped.available == 55
    again = gate_images(test, np.arange(5), list(reversed(others)), 20, seed=0)  # any order in, same sample out
    assert again.paths == capped.paths and list(again.labels) == list(capped.labels) == [0, 1, 2, 3, 4]
    assert "20 of 55" in capped.rule
    tiny = gate_images(test, np.arange(5), others, 3, seed=1)
    assert len(tiny.paths) == 3 and list(tiny.labels) == [int(p.stem) for p in tiny.paths]


def test_gate_config_names_the_flags() -> None:
    with pytest.raises(InputError, match="--int8-min-agreement"):
        Int8GateConfig(min_agreement=99)
    with pytest.raises(InputError, match="--max-int8-drop"):
        Int8GateConfig(max_drop=-0.1)


# --------------------------------------------------------------------------- repair


class FixedSpeed:
    """A probe that reports INT8 ``speedup`` times as fast as fp32 (no timing in tests)."""

    def __init__(self, speedup: float) -> None:
        self.speedup, self.calls = speedup, 0

    def __call__(self, fp32, int8, *, batch_size: int) -> ProbeResult:
        self.calls += 1
        return ProbeResult(2.0, 2.0 / self.speedup, batch_size, fp32.threads, batches=1, seconds=0.0)


def _repair(tmp_path: Path, bands, planted: int, speedup: float):
    from kidney_edge.int8_repair import measure_speedup, repair
    from kidney_edge.quantize import Int8Builder, QuantizationConfig

    paths, labels = bands
    fp32 = make_blocks_onnx(tmp_path / "model.onnx", blocks=4, planted=planted)
    spec = ModelSpec(input_size=32)
    builder = Int8Builder(fp32, paths, spec, QuantizationConfig(**MINMAX), tmp_path)
    candidate = tmp_path / "model.int8.onnx"
    recipe = builder.build(candidate)
    gate = Int8Gate(fp32, gate_images(paths[:8], labels[:8], paths, 1000, 0), Int8GateConfig(resamples=200))
    probe = FixedSpeed(speedup)
    first = (gate(candidate), measure_speedup(fp32, candidate, probe))
    assert not first[0]["passed"]
    outcome = repair(builder, gate, candidate, tmp_path, min_speedup=1.1, first=first, recipe=recipe, probe=probe)
    return outcome, candidate, probe.calls


def test_repair_keeps_exactly_the_planted_block_fp32(bands, tmp_path: Path) -> None:
    from kidney_edge.int8_repair import block_of

    outcome, candidate, probes = _repair(tmp_path, bands, planted=2, speedup=1.6)
    assert probes == 2  # the recipe, then one step: fast enough, measured once each
    ranking = outcome.sensitivity
    assert [row["block"] for row in ranking][0] == "blocks.2"
    assert ranking[0]["logit_relative_error"] > 20 * ranking[1]["logit_relative_error"]
    assert {row["block"] for row in ranking} == {"stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3"}
    assert outcome.blocks_fp32 == ["blocks.2"] and outcome.gate["passed"]
    assert outcome.gate["agreement"]["argmax"] == 1.0 and len(outcome.steps) == 1
    assert outcome.recipe["fp32_blocks"] == ["blocks.2"]
    model = onnx.load(str(candidate))
    float_convs = {n.name for n in model.graph.node if n.op_type == "Conv" and block_of(n.name) == "blocks.2"}
    quantized_inputs = {i for n in model.graph.node if n.op_type == "DequantizeLinear" for i in n.output}
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    for name, conv in convs.items():  # only the planted block's convs read float weights
        assert (conv.input[1] in quantized_inputs) == (name not in float_convs), name
    assert len(float_convs) == 2 and len(convs) == 9  # the stem and two per block


def test_repair_stops_when_int8_is_no_longer_faster(bands, tmp_path: Path) -> None:
    outcome, _, probes = _repair(tmp_path, bands, planted=1, speedup=1.05)
    assert outcome.blocks_fp32 == [] and not outcome.gate["passed"]
    assert "1.05x of fp32" in outcome.stopped and "< 1.10x" in outcome.stopped
    assert outcome.steps[0]["speedup"] == 1.05 and probes == 3  # "too slow" is measured twice before it stops
    assert outcome.steps[0]["blocks_fp32"] == ["blocks.1"] and outcome.steps[0]["passed"]


def test_block_names_follow_the_module_path() -> None:
    from kidney_edge.int8_repair import block_of

    assert block_of("/blocks/blocks.3/conv_pw/Conv") == "blocks.3"
    assert block_of("/stem/conv/Conv") == "stem"
    assert block_of("/features/features.1/features.1.0/block/Conv") == "features.1"
    assert block_of("/Flatten") is None and block_of("Conv_12") is None
    assert BLOCK_CENTRES[0] < BLOCK_CENTRES[-1]


def test_labels_veto_only_a_loss_shown_over_budget() -> None:
    """One flipped near-tie on a small split does not decide; a systematic loss does, whatever
    the agreement threshold."""
    spec = ModelSpec(input_size=32)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(120, 4)) * 5
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = probabilities.argmax(1)  # fp32 is right on every test image
    images = gate_images([Path(f"/x/{i}.png") for i in range(120)], labels, [], 1000, 0)
    config = Int8GateConfig(resamples=400)

    def int8_wrong_on(indices: np.ndarray) -> np.ndarray:
        int8 = probabilities.copy()
        int8[indices] = np.roll(int8[indices], 1, axis=1)
        return int8

    one = judge((logits, probabilities), (logits, int8_wrong_on(np.flatnonzero(labels == 3)[:1])), images, spec,
                Int8GateConfig(min_agreement=0.99, resamples=400))  # fmt: skip
    assert one["passed"] and one["labelled"]["argmax"]["positive_recall"]["drop_upper"] > 0.01
    many = judge((logits, probabilities), (logits, int8_wrong_on(np.arange(24))), images, spec,
                 dataclasses.replace(config, min_agreement=0.0))  # fmt: skip
    assert not many["passed"]
    assert {c["name"] for c in many["criteria"] if not c["passed"]} >= {"argmax macro_f1 drop"}
