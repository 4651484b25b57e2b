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


BLOCKS_SIZE = 32  # input size of the blocks model
BLOCK_CENTRES = (31, 95, 159, 223)  # gray levels the blocks model puts mid-way inside classes 0..3
PLANTED_OUTLIER = 1000.0  # the planted block's constant channel: 8-bit steps of ~4 over its range


def make_blocks_onnx(path: Path, *, blocks: int = 3, planted: int | None = None, spec: ModelSpec | None = None) -> Path:
    """A stem and ``blocks`` residual-free blocks with exporter-style names (``/blocks/blocks.K/...``),
    pooled into a linear head whose classes are brightness bands with wide margins.

    Every layer passes the image's brightness on (stem: a 1x1 conv, v = 2 x input + 2.5, so
    0.5..4.5 on Lite0 normalisation; each block two identity 1x1 convs with ReLU); logits of
    class k are s_k * v + b_k with class boundaries at v = 1.5, 2.5, 3.5: the gray levels of
    :data:`BLOCK_CENTRES` land mid-way (2 logit units of margin). With ``planted`` = K, block K's first conv also writes a
    constant :data:`PLANTED_OUTLIER` channel that its second conv ignores: fp32 is unchanged, but
    8-bit per-tensor activations (MinMax ranges) of that tensor lose the brightness, so quantizing
    that block, and only that one, is harmful.
    """
    from onnx import TensorProto, helper, numpy_helper

    spec = spec or ModelSpec(input_size=BLOCKS_SIZE)
    width, classes = 8, spec.num_classes
    inits = {"stem_w": np.full((width, 3, 1, 1), 2.0 / 3.0), "stem_b": np.full(width, 2.5),
             "head_w": np.tile(np.linspace(-6.0, 6.0, classes) / width, (width, 1)),
             "head_b": np.array([0.0, -6.0, -16.0, -30.0][:classes])}  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["input", "stem_w", "stem_b"], ["s0"], name="/stem/conv/Conv"),
        helper.make_node("Relu", ["s0"], ["x0"], name="/stem/act/Relu"),
    ]
    for k in range(blocks):
        inner = width + (k == planted)  # the planted block's extra channel: constant, then ignored
        first, first_b, second = np.eye(inner, width), np.zeros(inner), np.eye(width, inner)
        first_b[width:] = PLANTED_OUTLIER
        inits.update({f"b{k}_wa": first[:, :, None, None], f"b{k}_ba": first_b, f"b{k}_wb": second[:, :, None, None]})
        prefix = f"/blocks/blocks.{k}"
        nodes += [
            helper.make_node("Conv", [f"x{k}", f"b{k}_wa", f"b{k}_ba"], [f"a{k}"], name=f"{prefix}/conv_a/Conv"),
            helper.make_node("Relu", [f"a{k}"], [f"ra{k}"], name=f"{prefix}/act_a/Relu"),
            helper.make_node("Conv", [f"ra{k}", f"b{k}_wb"], [f"c{k}"], name=f"{prefix}/conv_b/Conv"),
            helper.make_node("Relu", [f"c{k}"], [f"x{k + 1}"], name=f"{prefix}/act_b/Relu"),
        ]
    nodes += [
        helper.make_node("GlobalAveragePool", [f"x{blocks}"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"], name="/classifier/Gemm"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
    ]
    size = spec.input_size
    graph = helper.make_graph(
        nodes,
        "blocks",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
        ],
        [numpy_helper.from_array(np.asarray(value, np.float32), name) for name, value in inits.items()],
    )
    return _save(graph, path, spec)


def write_band_images(folder: Path, per_class: int, *, size: int = BLOCKS_SIZE, seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """``per_class`` gray PNGs at each of :data:`BLOCK_CENTRES` (+ a little noise), and their
    classes: the blocks model's fp32 decisions, with wide margins."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for label, level in enumerate(BLOCK_CENTRES):
        for index in range(per_class):
            pixels = np.clip(rng.normal(level, 4.0, size=(size, size)), 0, 255).astype(np.uint8)
            path = folder / f"class{label}" / f"{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").save(path)
            paths.append(path)
            labels.append(label)
    return paths, np.array(labels, np.int64)
