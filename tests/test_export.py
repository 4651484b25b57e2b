"""Export: ONNX I/O contract, parity with PyTorch at another batch size, spec round trip, INT8 + gate."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from kidney_edge.checkpoint import save_checkpoint  # noqa: E402
from kidney_edge.errors import InputError, KidneyEdgeError  # noqa: E402
from kidney_edge.spec import ONNX_METADATA_KEY, DecisionRule, ModelSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checkpoint(
    path: Path, arch: str, *, pretrained: bool, size: int = 224, num_classes: int = 4, **spec_kw
) -> ModelSpec:
    from kidney_edge.backbones import backbone_spec_defaults, create_model

    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, input_size=size, **{**backbone_spec_defaults(arch), **spec_kw})
    model = create_model(arch, num_classes=num_classes, pretrained=pretrained)
    save_checkpoint(path, model=model, spec=spec, config={"test": True})
    return spec


@pytest.fixture(scope="module")
def splits_csv(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kidney_edge.dataset import SplitConfig, split_dataset

    csv = tmp_path_factory.mktemp("splits") / "splits.csv"
    split_dataset(phantom_dir, csv, SplitConfig(seed=0))
    return csv


@pytest.fixture(scope="module")
def lite0_export(splits_csv: Path, tmp_path_factory: pytest.TempPathFactory):
    """A pretrained Lite0 run folder (4 classes, 224 px, calibrated spec) exported with INT8."""
    from kidney_edge.export import ExportConfig, export_model

    run = tmp_path_factory.mktemp("run")
    rule = DecisionRule(kind="threshold", positive_class="Tumor", threshold=0.3, target_recall=0.98)
    spec = _checkpoint(
        run / "best.pt", "efficientnet_lite0", pretrained=True, temperature=1.7, decision_rule=rule
    )
    shutil.copy(splits_csv, run / "splits.csv")
    # A random head has near-tied logits, so INT8 may flip decisions: this fixture tests the
    # mechanics (the gate and the repair are tested in test_int8_gate.py), hence
    # --allow-int8-drop and --no-int8-repair.
    config = ExportConfig(
        calibration_images=8, max_parity_images=6, parity_batch_size=3, allow_int8_drop=True, int8_repair=False
    )
    result = export_model(run, run / "export", config)
    return result, spec


def _torch_outputs(checkpoint: Path, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from kidney_edge.checkpoint import load_model

    model, spec = load_model(checkpoint)
    with torch.no_grad():
        logits = model(torch.from_numpy(batch)).numpy()
    return logits, spec.probabilities(logits)


def test_lite0_onnx_matches_pytorch_at_batch_3_after_export_at_batch_1(
    lite0_export, splits_csv: Path
) -> None:
    from kidney_edge.dataset import read_splits
    from kidney_edge.imaging import preprocess_batch
    from kidney_edge.runtime import OnnxClassifier

    result, spec = lite0_export
    parity = json.loads(result.parity_path.read_text())
    assert parity["export_batch_size"] == 1 and parity["batch_size"] == 3 and parity["n_images"] == 6
    assert parity["thresholds"] == {"max_abs_diff": 1e-4, "argmax_agreement": 1.0}
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] == 1.0 and parity["passed"]
    assert parity["max_abs_diff_logits"] < 1e-3
    # Independently of export's own check: PyTorch (spec temperature applied in numpy) vs ONNX.
    test_paths = [row.path for row in read_splits(splits_csv) if row.split == "test"][:3]
    batch = preprocess_batch(test_paths, spec)  # (3, 3, 224, 224)
    torch_logits, torch_probabilities = _torch_outputs(result.out_dir.parent / "best.pt", batch)
    onnx_logits, onnx_probabilities = OnnxClassifier(result.model_path).run(batch)
    np.testing.assert_allclose(onnx_probabilities, torch_probabilities, atol=1e-4)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-3)
    assert (onnx_logits.argmax(1) == torch_logits.argmax(1)).all()


def test_onnx_graph_contract_and_spec_round_trip(lite0_export) -> None:
    result, spec = lite0_export
    model = onnx.load(str(result.model_path))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert {node.domain for node in model.graph.node} <= {""}  # standard ops only
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert [i.name for i in model.graph.input] == ["input"] and dims == ["batch", 3, 224, 224]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in model.graph.output] == [
        "logits",
        "probabilities",
        "features",
        "block_stats",
        "cam",
        "ood_score",  # the OOD detector, appended by export
    ]
    for path in (result.model_path, result.int8_path):
        metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert ModelSpec.from_json(metadata[ONNX_METADATA_KEY]) == spec
        assert json.loads(metadata["class_names"]) == ["Cyst", "Normal", "Stone", "Tumor"]


def test_features_and_cam_outputs_match_pytorch(lite0_export, splits_csv: Path) -> None:
    from kidney_edge.checkpoint import load_model
    from kidney_edge.dataset import read_splits
    from kidney_edge.imaging import preprocess_batch
    from kidney_edge.runtime import OnnxClassifier

    result, spec = lite0_export
    paths = [row.path for row in read_splits(splits_csv) if row.split == "test"][:3]
    batch = preprocess_batch(paths, spec)  # (3, 3, 224, 224)
    outputs = OnnxClassifier(result.model_path).infer(batch, features=True, block_stats=True, cam=True)
    model, _ = load_model(result.out_dir.parent / "best.pt")
    with torch.no_grad():
        x = torch.from_numpy(batch)
        feature_map = model.forward_features(x)  # (3, 1280, 7, 7)
        h, stats = model.stem(x), []
        for index, block in enumerate(model.blocks):
            h = block(h)
            if index in (5, 10, 15):  # Lite0's 16 blocks: a third in, two thirds in, the last
                stats += [h.mean(dim=(2, 3)), h.std(dim=(2, 3), unbiased=False)]
    pooled = feature_map.mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(outputs.features, pooled, atol=1e-4)
    expected_stats = torch.cat(stats, dim=1).numpy()  # (3, 2 * (80 + 112 + 320))
    assert outputs.block_stats.shape == (3, 1024)
    np.testing.assert_allclose(outputs.block_stats, expected_stats, atol=1e-3, rtol=1e-4)
    assert outputs.cam.shape == (3, 4, 7, 7)
    # CAM's spatial mean plus the classifier bias is the logit (Zhou et al. 2016).
    bias = model.classifier.bias.detach().numpy()
    np.testing.assert_allclose(outputs.cam.mean(axis=(2, 3)) + bias, outputs.logits, atol=1e-3)


def test_both_models_carry_an_ood_detector_with_their_own_threshold(lite0_export) -> None:
    from kidney_edge.runtime import OnnxClassifier, describe_onnx

    result, _ = lite0_export
    fp32, int8 = OnnxClassifier(result.model_path).ood, OnnxClassifier(result.int8_path).ood
    assert fp32 is not None and int8 is not None and fp32.method == int8.method
    assert result.parity["ood"]["threshold"] == fp32.threshold
    assert result.int8_gate["ood"]["threshold"] == int8.threshold
    assert fp32.n_val == int8.n_val > 0 and fp32.val_rejection <= 0.05
    assert describe_onnx(result.int8_path)["ood_detector"] == int8.describe()  # what `info` prints


def test_the_ood_fit_works_from_the_splits_export_read_once(
    lite0_export, splits_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """select_images reads splits.csv once; every OOD fit after it works from those rows."""
    from kidney_edge import labelled
    from kidney_edge.export import select_images
    from kidney_edge.export.ood_graph import file_detector

    result, spec = lite0_export
    reads: list[Path] = []
    read = labelled.read_splits
    monkeypatch.setattr(labelled, "read_splits", lambda path: reads.append(Path(path)) or read(path))
    images = select_images(splits_csv, (), spec)
    detector = file_detector(result.model_path, None, images.splits, result, None)
    assert reads == [splits_csv]
    val = sum(row.split == "val" for row in images.splits.rows)
    assert detector is not None and detector.n_val == val > 0 and detector.n_fit > 0


def test_int8_lite0_is_qdq_runs_and_is_gated(lite0_export) -> None:
    from kidney_edge.runtime import OnnxClassifier, describe_onnx

    result, spec = lite0_export
    model = onnx.load(str(result.int8_path))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") > 40 and ops.count("DequantizeLinear") > 40
    gate = result.int8_gate
    dequantized = {
        out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output
    }
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    float_convs = {node.name for node in convs if node.input[1] not in dequantized}
    assert float_convs == {node.name for node in convs} & set(gate["recipe"]["fp32_nodes"])
    assert len(convs) - len(float_convs) >= 40  # int8 weights (per channel) except in the early layers
    assert gate["recipe"]["fp32_layers"] == ["early"] and len(float_convs) == 9  # stem, blocks 0-2
    assert gate["recipe"]["format"] == "QDQ" and gate["recipe"]["per_channel"] is True
    assert gate["recipe"]["calibration_images"] == 8
    assert any("fewer than 300" in w for w in gate["warnings"])
    assert gate["reference"] == "labels" and gate["n_images"] == gate["labelled"]["n_images"] > 0
    assert set(gate["fp32"]) == {"argmax", "rule"} and gate["positive_class"] == "Tumor"
    splits = [row for row in _read_rows(result) if row.split in ("train", "val", "test")]
    assert gate["agreement"]["n_images"] == gate["agreement"]["available"] == len(splits)  # every image, once
    assert gate["deciding"].startswith("INT8 gate") and gate["repair"]["stopped"] in (
        "off (--no-int8-repair)", "not needed: the recipe passed")
    assert gate["speed"]["speedup"] > 0 and gate["speed"]["batch_size"] == 8 and gate["seconds"] > 0
    assert gate["recipe"]["cpu"] == gate["speed"]["cpu"] and "cores)" in gate["recipe"]["cpu"]
    for decision in ("argmax", "rule"):
        assert set(gate["fp32"][decision]) == {"accuracy", "macro_f1", "positive_recall"}
        assert gate["delta"][decision]["macro_f1"] == pytest.approx(
            gate["int8"][decision]["macro_f1"] - gate["fp32"][decision]["macro_f1"]
        )
    assert {"avx2", "avx512f", "vnni", "onnxruntime"} <= set(gate["cpu"])
    classifier = OnnxClassifier(result.int8_path)
    rng = np.random.default_rng(0)
    logits, probabilities = classifier.run(rng.normal(size=(5, 3, 224, 224)).astype(np.float32))
    assert logits.shape == (5, 4) and np.all(np.isfinite(logits))
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, spec.probabilities(logits), atol=1e-5)  # head stayed fp32
    info = describe_onnx(result.int8_path)
    assert info["is_int8"] and info["opset"] == 17 and info["spec"] == spec.to_dict()
    assert describe_onnx(result.model_path)["is_int8"] is False


def test_describe_onnx_without_the_onnx_package(lite0_export, monkeypatch: pytest.MonkeyPatch) -> None:
    from kidney_edge.runtime import describe_onnx

    result, spec = lite0_export
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError, as in a base install
    fp32, int8 = describe_onnx(result.model_path), describe_onnx(result.int8_path)
    assert fp32["opset"] == 17 and fp32["is_int8"] is False and int8["is_int8"] is True
    assert fp32["inputs"] == [{"name": "input", "type": "tensor(float)", "shape": ["batch", 3, 224, 224]}]
    assert [o["name"] for o in fp32["outputs"]] == [
        "logits",
        "probabilities",
        "features",
        "block_stats",
        "cam",
        "ood_score",
    ]
    assert fp32["size_bytes"] == result.model_path.stat().st_size and fp32["producer"].startswith(
        "kidney-edge"
    )


def test_broken_int8_trips_the_gate_without_labels(lite0_export, tmp_path: Path) -> None:
    from kidney_edge.int8_gate import Int8Gate, Int8GateConfig, gate_images

    result, _ = lite0_export
    broken = tmp_path / "broken.int8.onnx"
    _perturb_int8_weights(result.int8_path, broken)
    paths = [row.path for row in _read_rows(result) if row.split == "test"][:8]
    gate = Int8Gate(result.model_path, gate_images(paths, None, [], 100, 0), Int8GateConfig())
    record = gate(broken)
    assert record["reference"] == "fp32_decisions" and record["labelled"] is None
    assert not record["passed"] and record["failures"][0].startswith("argmax agreement with fp32")
    same = gate(result.model_path)
    assert same["passed"] and same["agreement"]["rule"] == 1.0 and same["agreement"]["max_abs_diff_probabilities"] == 0.0


def _read_rows(result) -> list:
    from kidney_edge.dataset import read_splits

    return read_splits(result.out_dir.parent / "splits.csv")


def _perturb_int8_weights(source: Path, target: Path) -> None:
    """A 'quantization bug': shuffle every int8 weight tensor (shapes and scales untouched)."""
    from onnx import numpy_helper

    model = onnx.load(str(source))
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT8:
            values = numpy_helper.to_array(tensor).copy()
            flat = values.reshape(-1)
            rng.shuffle(flat)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(model, str(target))


def test_gate_failure_keeps_fp32_and_renames_int8(tmp_path: Path, phantom_dir: Path, monkeypatch) -> None:
    from kidney_edge.export import ExportConfig, export_model
    from kidney_edge.quantize import Int8Builder

    _checkpoint(tmp_path / "small.pt", "efficientnet_lite0", pretrained=True, size=64)

    def broken_build(self, int8_path, extra_fp32_nodes=(), *, fp32_blocks=()):
        _perturb_fp32_weights(self.fp32_path, Path(int8_path))
        return {"format": "QDQ", "activation_type": "uint8", "calibration_images": len(self.calibration_paths)}

    monkeypatch.setattr(Int8Builder, "build", broken_build)
    images = sorted(phantom_dir.glob("*/*.jpg"))[::12]
    out = tmp_path / "out"
    config = ExportConfig(images=images, max_parity_images=4, parity_batch_size=2, int8_repair=False)
    result = export_model(tmp_path / "small.pt", out, config)  # fp32 ships; the warning says why not INT8
    assert result.int8_path is None and result.rejected_int8_path == out / "model.int8.rejected.onnx"
    assert [w for w in result.warnings if w.startswith("no INT8 shipped: INT8 gate FAILED")]
    assert (out / "model.onnx").is_file() and not (out / "model.int8.onnx").exists()
    assert (out / "model.int8.rejected.onnx").is_file()
    required = dataclasses.replace(config, require_int8=True)
    with pytest.raises(KidneyEdgeError, match="INT8 gate FAILED.*--no-int8-repair.*--allow-int8-drop.*--require-int8"):
        export_model(tmp_path / "small.pt", out, required)
    parity = json.loads((out / "parity.json").read_text())
    assert (
        parity["passed"]
        and parity["int8"]["passed"] is False
        and parity["int8"]["model"] == "model.int8.rejected.onnx"
    )

    config = ExportConfig(
        images=images, max_parity_images=4, parity_batch_size=2, allow_int8_drop=True, int8_repair=False
    )
    result = export_model(tmp_path / "small.pt", out, config)
    assert result.int8_path == out / "model.int8.onnx" and result.int8_path.is_file()
    assert not (out / "model.int8.rejected.onnx").exists()  # the stale reject went with the new export
    assert any("--allow-int8-drop" in w for w in result.warnings)


def _perturb_fp32_weights(source: Path, target: Path) -> None:
    from onnx import numpy_helper

    model = onnx.load(str(source))
    rng = np.random.default_rng(1)
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32 and values.ndim == 4:
            noisy = values + rng.normal(scale=values.std() * 2, size=values.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    onnx.save(model, str(target))


def test_b0_without_pretrained_weights_via_cli(tmp_path: Path, splits_csv: Path) -> None:
    from typer.testing import CliRunner

    from kidney_edge.cli import app

    _checkpoint(tmp_path / "b0.pt", "efficientnet_b0", pretrained=False)
    out = tmp_path / "export" / "b0"
    args = ["export", str(tmp_path / "b0.pt"), "--out", str(out), "--no-int8", "--splits", str(splits_csv)]
    outcome = CliRunner().invoke(app, [*args, "--parity-batch-size", "3", "--parity-images", "3"])
    assert outcome.exit_code == 0, outcome.output
    parity = json.loads((out / "parity.json").read_text())
    assert parity["batch_size"] == 3 and parity["n_images"] == 3 and parity["max_abs_diff"] <= 1e-4
    assert parity["argmax_agreement"] == 1.0 and "int8" not in parity
    assert not (out / "model.int8.onnx").exists()
    text = "".join(outcome.output.split())
    assert f"kidney-edgepredictFOLDER--model{out / 'model.onnx'}" in text
    assert f"kidney-edgebenchmark--model{out / 'model.onnx'}" in text


def test_a_pair_model_exports_with_parity_and_its_class_maps(tmp_path: Path, splits_csv: Path) -> None:
    from typer.testing import CliRunner

    from kidney_edge.cli import app
    from kidney_edge.dataset import read_splits
    from kidney_edge.imaging import preprocess_batch
    from kidney_edge.runtime import OnnxClassifier

    spec = _checkpoint(tmp_path / "pair.pt", "efficientnet_lite0_pair", pretrained=True, size=96)
    out = tmp_path / "export" / "pair"
    args = ["export", str(tmp_path / "pair.pt"), "--out", str(out), "--no-int8", "--splits", str(splits_csv)]
    outcome = CliRunner().invoke(app, [*args, "--parity-batch-size", "3", "--parity-images", "3"])
    assert outcome.exit_code == 0, outcome.output
    parity = json.loads((out / "parity.json").read_text())
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] == 1.0
    classifier = OnnxClassifier(out / "model.onnx")
    assert classifier.spec.arch == "efficientnet_lite0_pair" and classifier.spec.resize.value == "stretch"
    paths = [row.path for row in read_splits(splits_csv) if row.split == "test"][:2]
    outputs = classifier.infer(preprocess_batch(paths, spec), features=True, cam=True)
    assert outputs.features.shape == (2, 2 * 1280) and outputs.cam.shape == (2, 4, 1, 2)
    logits, _ = _torch_outputs(tmp_path / "pair.pt", preprocess_batch(paths, spec))
    bias = torch.load(tmp_path / "pair.pt", weights_only=True)["model_state"]["classifier.bias"].numpy()
    np.testing.assert_allclose(outputs.cam.mean(axis=(2, 3)) + bias, logits, atol=1e-3)


def test_checkpoint_with_wrong_classes_fails_clearly(tmp_path: Path) -> None:
    from kidney_edge.backbones import create_model
    from kidney_edge.export import ExportConfig, export_model

    model = create_model("efficientnet_lite0", num_classes=3, pretrained=False)  # head: 3 outputs
    save_checkpoint(tmp_path / "bad.pt", model=model, spec=ModelSpec(input_size=64), config={})  # 4 classes
    with pytest.raises(InputError, match=r"bad\.pt.*(do not fit|classes)"):
        export_model(tmp_path / "bad.pt", tmp_path / "out", ExportConfig(images=(tmp_path,)))
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_corrupted_or_missing_source_fails_clearly(tmp_path: Path) -> None:
    from kidney_edge.export import export_model

    (tmp_path / "best.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(InputError, match="not a readable kidney-edge checkpoint"):
        export_model(tmp_path, tmp_path / "out")  # a run folder whose best.pt is corrupted
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(InputError, match="no best.pt"):
        export_model(tmp_path / "empty_run", tmp_path / "out")
    with pytest.raises(InputError, match="no such run folder or checkpoint"):
        export_model(tmp_path / "missing.pt", tmp_path / "out")


def test_checkpoint_without_images_asks_for_splits(tmp_path: Path) -> None:
    from kidney_edge.export import export_model

    _checkpoint(tmp_path / "m.pt", "efficientnet_lite0", pretrained=False, size=64)
    with pytest.raises(InputError, match="--splits"):
        export_model(tmp_path / "m.pt", tmp_path / "out")


@pytest.mark.parametrize(
    ("options", "flag"),
    [({"opset": 13}, "--opset"), ({"parity_batch_size": 1}, "--parity-batch-size"),
     ({"calibration_images": 0}, "--calibration-images"), ({"exporter": "tf"}, "--exporter"),
     ({"int8": False, "require_int8": True}, "--require-int8")],
)  # fmt: skip
def test_export_config_names_the_flag(options: dict, flag: str) -> None:
    from kidney_edge.export import ExportConfig

    with pytest.raises(InputError, match=flag):
        ExportConfig(**options)


def test_activation_type_auto_follows_the_cpu() -> None:
    from kidney_edge.quantize import ActivationType, QuantizationConfig, resolve_activation_type

    assert resolve_activation_type(ActivationType.AUTO, "x86_64") is ActivationType.UINT8
    assert resolve_activation_type(ActivationType.AUTO, "aarch64") is ActivationType.INT8
    assert resolve_activation_type(ActivationType.INT8, "x86_64") is ActivationType.INT8
    with pytest.raises(InputError, match="--int8-activations"):
        QuantizationConfig(activation_type="int4")


def test_default_out_dir_is_named_after_the_run(tmp_path: Path) -> None:
    from kidney_edge.export import default_out_dir

    run = tmp_path / "lite0_run"
    run.mkdir()
    (run / "best.pt").touch()
    (tmp_path / "other.pt").touch()
    assert default_out_dir(run) == Path("export/lite0_run")
    assert default_out_dir(run / "best.pt") == Path("export/lite0_run")
    assert default_out_dir(tmp_path / "other.pt", "out") == Path("out/other")


def test_reduce_range_auto_only_where_u8s8_can_saturate() -> None:
    from kidney_edge.quantize import ActivationType, resolve_reduce_range

    no_vnni, vnni = {"machine": "x86_64", "vnni": False}, {"machine": "x86_64", "vnni": True}
    assert resolve_reduce_range(None, ActivationType.UINT8, no_vnni) is True
    assert resolve_reduce_range(None, ActivationType.UINT8, vnni) is False
    assert resolve_reduce_range(None, ActivationType.INT8, no_vnni) is False
    assert resolve_reduce_range(None, ActivationType.UINT8, {"machine": "aarch64", "vnni": False}) is False
    assert resolve_reduce_range(False, ActivationType.UINT8, no_vnni) is False
