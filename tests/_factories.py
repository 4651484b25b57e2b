"""Tiny ONNX models for the tests: real graphs with a real ModelSpec in their metadata, built with
onnx.helper in milliseconds, so that runtime tests need neither PyTorch nor a trained model.

- :func:`make_tiny_onnx`: pool -> linear -> softmax(logits / T); the default model of the tests.
- :func:`make_conv_onnx`: two small convolutions, slow enough to time (benchmark tests).
- :func:`make_cam_onnx`: a class-activation-map output beside the logits (serve's ``cam``).

``onnx`` is imported inside the factories: importing this module needs only numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kidney_edge.spec import ONNX_METADATA_KEY, ModelSpec

SIZE = 32  # input size of the tiny and CAM models
CONV_SIZE = 64  # input size of the conv model: ~10 M MACs, about a millisecond, above timer noise
OPSET = 17
IR_VERSION = 8  # pinned: the installed onnx may default to an IR version newer than onnxruntime reads


def _save(graph: object, path: Path, spec: ModelSpec | None) -> Path:
    """Write ``graph`` as a model at ``path`` (parents created), with ``spec`` in its metadata."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    if spec is not None:
        helper.set_model_props(model, {ONNX_METADATA_KEY: spec.to_json()})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_tiny_onnx(
    path: Path, spec: ModelSpec | None = None, *, seed: int = 0, metadata: bool = True
) -> Path:
    """input (N,3,S,S) -> GlobalAveragePool -> Flatten -> Gemm -> logits; softmax(logits/T) -> probabilities."""
    from onnx import TensorProto, helper, numpy_helper

    spec = spec or ModelSpec(input_size=SIZE)
    rng = np.random.default_rng(seed)
    # Gray inputs have equal channel means, so the logits move with one number: the image's
    # mean brightness. Slopes of both signs make different images land in different classes.
    weight = np.zeros((3, spec.num_classes), np.float32)
    weight[0] = np.linspace(-6.0, 6.0, spec.num_classes)
    bias = rng.normal(scale=0.5, size=spec.num_classes).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
        helper.make_node("Div", ["logits", "T"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probabilities"], axis=1),
    ]
    size, classes = spec.input_size, spec.num_classes
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
        ],
        [
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array(spec.temperature, np.float32), "T"),
        ],
    )
    return _save(graph, path, spec if metadata else None)


def make_conv_onnx(path: Path, *, int8_sibling: bool = False) -> Path:
    """A small conv net at :data:`CONV_SIZE`; ``int8_sibling`` adds ``model.int8.onnx`` beside it (dynamic INT8)."""
    from onnx import TensorProto, helper, numpy_helper

    spec = ModelSpec(input_size=CONV_SIZE)
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.normal(scale=0.2, size=(16, 3, 3, 3)),
        "w2": rng.normal(scale=0.05, size=(16, 16, 3, 3)),
        "fc": rng.normal(scale=0.1, size=(16, spec.num_classes)),
        "fc_b": np.zeros(spec.num_classes),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, CONV_SIZE, CONV_SIZE])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4]),
        ],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in inits.items()],
    )
    _save(graph, path, spec)
    if int8_sibling:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(path.with_name("model.int8.onnx")), weight_type=QuantType.QInt8)
    return path


CAM_POOL = 8  # the CAM model's feature map is (SIZE / CAM_POOL) squared


def make_cam_onnx(path: Path, spec: ModelSpec | None = None) -> Path:
    """A CAM-shaped tiny model: input -> AveragePool(8) -> 1x1 Conv = cam (N, C, h, w) ->
    GlobalAveragePool -> + bias = logits -> softmax(logits / T) = probabilities.

    Its logits are the spatial mean of its cam, as for a CNN with a linear head; class weights
    slope from -6 (class 0) to +6 (last class), so dark images are class 0 and bright ones the last.
    """
    from onnx import TensorProto, helper, numpy_helper

    spec = spec or ModelSpec(input_size=SIZE)
    classes, size = spec.num_classes, spec.input_size
    weight = np.zeros((classes, 3, 1, 1), np.float32)
    weight[:, 0, 0, 0] = np.linspace(-6.0, 6.0, classes)
    nodes = [
        helper.make_node(
            "AveragePool", ["input"], ["features"], kernel_shape=[CAM_POOL] * 2, strides=[CAM_POOL] * 2
        ),
        helper.make_node("Conv", ["features", "W"], ["cam"]),
        helper.make_node("GlobalAveragePool", ["cam"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Add", ["flat", "b"], ["logits"]),
        helper.make_node("Div", ["logits", "T"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probabilities"], axis=1),
    ]
    h = size // CAM_POOL
    graph = helper.make_graph(
        nodes,
        "tiny-cam",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", classes, h, h]),
        ],
        [
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(np.zeros(classes, np.float32), "b"),
            numpy_helper.from_array(np.array(spec.temperature, np.float32), "T"),
        ],
    )
    return _save(graph, path, spec)
