"""Recipe options of the INT8 quantizer: layers kept in fp32 (by graph position), pre-processing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _factories import make_conv_onnx
from test_runtime import write_gray_images

from kidney_edge.errors import InputError
from kidney_edge.quantize import Fp32Layer, QuantizationConfig, layer_node_names, quantize_model
from kidney_edge.spec import ModelSpec


def graph_with_a_residual_and_a_conv_off_the_logits_path():
    """conv1 -> conv2 -> add(conv1, conv2) -> conv3 -> pool -> Gemm -> logits; conv3 -> cam_conv -> cam."""
    from onnx import TensorProto, helper, numpy_helper

    weights = {
        "w1": np.ones((4, 3, 3, 3), np.float32),
        "w2": np.ones((4, 4, 1, 1), np.float32),
        "w3": np.ones((4, 4, 1, 1), np.float32),
        "wc": np.ones((2, 4, 1, 1), np.float32),
        "fc": np.ones((4, 2), np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c1", "c2"], ["r"], name="residual"),
        helper.make_node("Conv", ["r", "w3"], ["c3"], name="conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], name="gemm"),
        helper.make_node("Conv", ["c3", "wc"], ["cam"], name="cam_conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("logits", "cam")],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return helper.make_model(graph)


def test_layers_are_found_by_graph_position() -> None:
    model = graph_with_a_residual_and_a_conv_off_the_logits_path()
    assert layer_node_names(model, [Fp32Layer.STEM]) == ["conv1"]
    assert layer_node_names(model, [Fp32Layer.EARLY]) == [
        "conv1",
        "conv2",
        "residual",
    ]  # up to the first residual
    assert layer_node_names(model, [Fp32Layer.LAST_CONV]) == ["conv3"]  # not cam_conv: it feeds no logits
    assert layer_node_names(model, [Fp32Layer.STEM, Fp32Layer.LAST_CONV]) == ["conv1", "conv3"]
    assert layer_node_names(model, []) == []


def test_config_validates_fp32_layers() -> None:
    config = QuantizationConfig(fp32_layers=("stem", "last-conv", "stem"))
    assert config.fp32_layers == (Fp32Layer.STEM, Fp32Layer.LAST_CONV)
    with pytest.raises(InputError, match="--int8-fp32-layers must be one of stem, early, last-conv"):
        QuantizationConfig(fp32_layers=("head",))


@pytest.mark.parametrize("pre_process", [True, False])
def test_quantize_keeps_the_chosen_layers_fp32(tmp_path: Path, pre_process: bool) -> None:
    import onnx

    fp32 = make_conv_onnx(tmp_path / "model.onnx")
    images = write_gray_images(tmp_path / "images", 8, size=64)
    config = QuantizationConfig(fp32_layers=("stem",), pre_process=pre_process, calibration_batch_size=4)
    recipe = quantize_model(fp32, tmp_path / "int8.onnx", images, ModelSpec(input_size=64), config)
    assert recipe["fp32_layers"] == ["stem"] and recipe["pre_process"] is pre_process
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    convs = [node for node in graph.node if node.op_type == "Conv"]
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    stem, second = convs
    assert stem.name in recipe["fp32_nodes"] and stem.input[1] not in dequantized  # float weights
    assert second.input[1] in dequantized and second.input[0] in dequantized  # int8 weights and input


def _scale_of(graph, tensor: str) -> float:
    """The scale of the QuantizeLinear that quantizes ``tensor``."""
    from onnx import numpy_helper

    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    node = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return float(inits[node.input[1]])


def test_a_lower_percentile_clips_the_activation_range(tmp_path: Path) -> None:
    """CalibPercentile reaches onnxruntime: 99.9% of the first ReLU's histogram is a narrower range
    (a finer scale) than 99.999%, and the recipe records it."""
    import onnx

    fp32 = make_conv_onnx(tmp_path / "model.onnx")
    images = write_gray_images(tmp_path / "images", 8, size=64)
    scales = {}
    for percentile in (99.9, 99.999):
        config = QuantizationConfig(
            activation_type="uint8", calibrate_method="percentile", calibration_percentile=percentile,
            fp32_layers=(), pre_process=False, calibration_batch_size=4,
        )  # fmt: skip
        int8 = tmp_path / f"int8.{percentile}.onnx"
        recipe = quantize_model(fp32, int8, images, ModelSpec(input_size=64), config)
        assert recipe["CalibPercentile"] == percentile
        scales[percentile] = _scale_of(onnx.load(str(int8)).graph, "r1")
    assert scales[99.9] < 0.99 * scales[99.999]


def test_config_validates_the_calibration_options() -> None:
    with pytest.raises(InputError, match="calibration percentile must be in"):
        QuantizationConfig(calibration_percentile=100.5)
    with pytest.raises(InputError, match="moving average of ranges needs MinMax calibration, not entropy"):
        QuantizationConfig(calibrate_method="entropy", moving_average=True)
    assert QuantizationConfig(calibrate_method="minmax", moving_average=True).moving_average
