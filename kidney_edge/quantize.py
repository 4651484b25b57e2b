"""INT8 static quantization (onnxruntime, QDQ, per-channel weights).

Naive INT8 can cost EfficientNets 20-60 points of accuracy, so an INT8 file only ships when it
passes :mod:`kidney_edge.int8_gate` (repaired by :mod:`kidney_edge.int8_repair` first when it
does not). :class:`Int8Builder` prepares and calibrates an fp32 graph once and writes INT8
copies with any set of nodes kept fp32. Everything here runs on onnxruntime: no torch.
``onnx`` (train extra) edits the graph.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.errors import InputError, KidneyEdgeError, enum_choice
from kidney_edge.runtime import cpu_isa
from kidney_edge.spec import ModelSpec

log = logging.getLogger(__name__)

# Below this many calibration images, activation ranges are noisy and the export warns: MinMax
# agreed with fp32 on 46% of decisions at 100 images and 50% at 300, on a near-chance model
# (benchmarks/results/int8.md).
MIN_CALIBRATION_IMAGES = 300


class ActivationType(str, Enum):
    """Activation type of the QDQ graph; weights are always signed 8-bit (per channel)."""

    AUTO = "auto"  # uint8 on x86-64 (U8S8 kernels), int8 elsewhere (ARM has S8S8 dot products)
    UINT8 = "uint8"
    INT8 = "int8"


class CalibrationMethod(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"


class Fp32Layer(str, Enum):
    """Layers a recipe may keep in fp32 besides the head, found by their place in the graph (not
    by name, so any exporter's graph works)."""

    STEM = "stem"  # the first Conv: it reads the normalised image
    # The stem and every block up to the first residual Add (Lite0: the stem and blocks 0-2, all
    # at the two highest resolutions): quantization noise injected there is amplified by the
    # whole network (benchmarks/results/int8.md, per-block sensitivity).
    EARLY = "early"
    LAST_CONV = "last-conv"  # the last Conv before the logits: its output is pooled into the features


@dataclass(frozen=True)
class QuantizationConfig:
    """How ``model.int8.onnx`` is made. Defaults chosen by benchmarks/bench_int8.py (int8.md).

    The default keeps the early layers in fp32 and calibrates with Entropy: on the demo and
    three recipe-benchmark models it was the one recipe of 19 that passed the 1-point gate on
    all four. Keeping the early layers fp32 cut the INT8 logit error 1.5-6.5x on every model
    (quantizing block 0 alone costs the logits as much as quantizing the whole network); INT8
    then ran 1.5-1.9x faster than fp32 on an AVX-512 VNNI CPU against 1.6-2.0x for MinMax with
    only the head fp32. On a fully trained demo (AMD EPYC, AVX-512 VNNI) it agreed with fp32 on
    over 99% of decisions at about 1.5x, but the gate's labelled deltas failed on one test image
    sitting on the argmax boundary; Percentile (99.9%, 99.999%), MinMax with a moving average and
    class-balanced calibration did no better (int8.md, recipe variants of that CPU kind).
    """

    activation_type: ActivationType = ActivationType.AUTO
    calibrate_method: CalibrationMethod = CalibrationMethod.ENTROPY
    # Percentile calibration only: the share of each activation's histogram kept in range.
    calibration_percentile: float = 99.999
    moving_average: bool = False  # MinMax only: ranges are a moving average over batches
    per_channel: bool = True
    reduce_range: bool | None = None  # 7-bit weights; None: see resolve_reduce_range
    calibration_batch_size: int = 8  # x ~50 MB of intermediate tensors per image (Lite0, 224 px)
    fp32_layers: tuple[Fp32Layer, ...] = (Fp32Layer.EARLY,)  # kept in fp32 besides the head
    fp32_nodes: tuple[str, ...] = ()  # more nodes kept in fp32, by name (model-specific: benchmarks)
    pre_process: bool = True  # onnxruntime's quant_pre_process (shape inference + fusions) first

    def __post_init__(self) -> None:
        activation = enum_choice(ActivationType, self.activation_type, "--int8-activations")
        method = enum_choice(CalibrationMethod, self.calibrate_method, "--calibration-method")
        layers = tuple(
            dict.fromkeys(enum_choice(Fp32Layer, layer, "--int8-fp32-layers") for layer in self.fp32_layers)
        )
        object.__setattr__(self, "activation_type", activation)
        object.__setattr__(self, "calibrate_method", method)
        object.__setattr__(self, "fp32_layers", layers)
        object.__setattr__(self, "fp32_nodes", tuple(str(name) for name in self.fp32_nodes))
        if not 50.0 < self.calibration_percentile <= 100.0:
            raise InputError(
                f"calibration percentile must be in (50, 100], got {self.calibration_percentile}"
            )
        if self.moving_average and method is not CalibrationMethod.MINMAX:
            raise InputError(f"a moving average of ranges needs MinMax calibration, not {method.value}")
        if not 1 <= self.calibration_batch_size <= 256:
            raise InputError(f"calibration batch size must be in 1..256, got {self.calibration_batch_size}")


def resolve_reduce_range(reduce_range: bool | None, activation: ActivationType, isa: dict[str, Any]) -> bool:
    """``None`` -> 7-bit weights for uint8 activations on an x86-64 CPU without VNNI.

    There onnxruntime's U8S8 kernels use AVX2 ``vpmaddubsw``, whose int16 sum of two u8 x s8
    products saturates with full-range weights; 7-bit weights cannot saturate. Measured here
    (AVX2, no VNNI; benchmarks/results/int8.md): ImageNet Lite0 logit error 0.37 with 8-bit
    weights on the fused kernels vs 0.15 in unfused reference numerics, 0.29 with 7-bit
    weights either way. VNNI's ``vpdpbusd`` accumulates in int32, so 8-bit weights are better
    there. The choice follows the exporting CPU and is recorded in the recipe: an INT8 file made
    on a VNNI machine and run on an AVX2-only one saturates (pass reduce_range=True there).
    """
    if reduce_range is not None:
        return reduce_range
    x86 = str(isa.get("machine", "")).lower() in ("x86_64", "amd64", "i686", "x86")
    return activation is ActivationType.UINT8 and x86 and not isa.get("vnni", False)


def resolve_activation_type(activation_type: ActivationType, machine: str | None = None) -> ActivationType:
    """``auto`` -> uint8 on x86-64, int8 on ARM.

    onnxruntime's x86 kernels (AVX2 ``vpmaddubsw``, AVX-512/AVX-VNNI ``vpdpbusd``) multiply
    unsigned activations by signed weights. Checked on Lite0 with onnxruntime 1.32 here: the
    U8S8 graph fuses completely (49 QLinearConv, 9 QLinearAdd, one Q and one DQ), while the
    S8S8 one keeps 14 Convs in fp32 behind DequantizeLinear plus 30 Transposes. On AVX-512 VNNI
    S8S8 runs 1.0-1.3x faster than fp32 and U8S8 2.0-2.5x (docs/architecture.md, "Planning figures").
    ARM's dot products are S8S8.
    """
    if activation_type is not ActivationType.AUTO:
        return activation_type
    machine = (machine or platform.machine()).lower()
    return ActivationType.INT8 if machine in ("arm64", "aarch64") else ActivationType.UINT8


# --------------------------------------------------------------------------- calibration


def calibration_reader(paths: Sequence[Path], spec: ModelSpec, batch_size: int, progress: Any):
    """A CalibrationDataReader of preprocessed batches (the one shared preprocessing).

    Items are batches; ``set_range`` lets quantize_static's strided mode (``CalibStridedMinMax``)
    collect one batch per call. Without it onnxruntime's calibrators keep every intermediate
    tensor of every calibration image in memory (~50 MB per image for Lite0 at 224 px: 15 GB
    for 300 images); strided, they fold ranges/histograms batch by batch.
    """
    from onnxruntime.quantization import CalibrationDataReader

    from kidney_edge.imaging import preprocess_batch

    starts = list(range(0, len(paths), batch_size))

    class ImageCalibrationReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(starts))

        def __len__(self) -> int:
            return len(starts)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._next, self._end = start_index, min(end_index, len(starts))

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._next >= self._end:
                return None
            start = starts[self._next]
            self._next += 1
            chunk = paths[start : start + batch_size]
            if progress is not None:
                progress(start + len(chunk), len(paths))
            return {"input": preprocess_batch(chunk, spec)}  # (n, 3, S, S) float32

        def rewind(self) -> None:
            self.set_range(0, len(starts))

    return ImageCalibrationReader()


def _head_node_names(model: Any) -> list[str]:
    """Nodes that produce the ``logits`` output and everything downstream of it.

    They stay fp32: the classifier Gemm is a negligible share of the compute, and quantizing
    Softmax would round probabilities to 1/256 steps, which moves a tuned tumor threshold.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    head = {producers["logits"].name} if "logits" in producers else set()
    tensors = {"logits"}
    changed = True
    while changed:  # graphs are topologically sorted, but a fixpoint does not rely on it
        changed = False
        for node in model.graph.node:
            if node.name not in head and tensors & set(node.input):
                head.add(node.name)
                tensors.update(node.output)
                changed = True
    return sorted(head)


def _ancestors(model: Any, output: str) -> set[str]:
    """Names of the nodes ``output`` depends on (itself included)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    found: set[str] = set()
    stack = [output]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and node.name not in found:
            found.add(node.name)
            stack.extend(node.input)
    return found


def layer_node_names(model: Any, layers: Sequence[Fp32Layer]) -> list[str]:
    """The node of each of ``layers`` in ``model`` (an onnx ModelProto with named nodes).

    The stem is the first Conv of the graph (graphs are topologically sorted); ``early`` is the
    first residual Add (an Add of two computed tensors) and every node it depends on, or the
    stem alone in a graph without one; the last conv is the last Conv that the ``logits``
    output depends on: other Convs, such as the class activation maps' projection, come after
    it but do not feed the decision.
    """
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    if not convs:
        return []
    constants = {init.name for init in model.graph.initializer}
    residual = next(
        (n for n in model.graph.node if n.op_type == "Add" and not constants & set(n.input)), None
    )
    feeding = _ancestors(model, "logits")
    names = {
        Fp32Layer.STEM: {convs[0].name},
        Fp32Layer.EARLY: _ancestors(model, residual.output[0]) if residual else {convs[0].name},
        Fp32Layer.LAST_CONV: {next((n.name for n in reversed(convs) if n.name in feeding), convs[-1].name)},
    }
    return sorted(set().union(*(names[layer] for layer in layers)))


def _name_unnamed_nodes(model: Any) -> None:
    # nodes_to_exclude works by name; exporters may leave names empty.
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"


# --------------------------------------------------------------------------- quantize


class Int8Builder:
    """One fp32 graph, prepared and calibrated once; INT8 copies with any set of nodes kept fp32.

    ``quant_pre_process`` (shape inference + onnxruntime's basic fusions) runs first unless
    ``config.pre_process`` is off, so Q/DQ pairs go on the fused graph. The first :meth:`build`
    calibrates activation ranges on every tensor and stores them in onnxruntime's calibration
    cache under ``workdir``; later builds reuse them, whichever nodes they keep fp32 (ranges do
    not depend on the exclusions), so a repair candidate costs a quantizer pass, not a
    calibration. The head (classifier Gemm, temperature, Softmax) and ``config.fp32_layers``
    always stay fp32.
    """

    def __init__(
        self,
        fp32_path: str | os.PathLike[str],
        calibration_paths: Sequence[Path],
        spec: ModelSpec,
        config: QuantizationConfig,
        workdir: Path,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        import onnx

        if not calibration_paths:
            raise InputError("INT8 calibration needs images: pass --splits with a train split, or --no-int8")
        self.fp32_path, self.spec, self.config = Path(fp32_path), spec, config
        self.calibration_paths, self.progress = list(calibration_paths), progress
        self.activation = resolve_activation_type(config.activation_type)
        self.reduce_range = resolve_reduce_range(config.reduce_range, self.activation, cpu_isa())
        self.prepared, self.cache = workdir / "prepared.onnx", workdir / "calibration.json"
        self.base_fp32_nodes = prepare_for_quantization(self.fp32_path, self.prepared, config)
        self.node_names = [node.name for node in onnx.load(str(self.prepared)).graph.node]

    def build(
        self,
        int8_path: str | os.PathLike[str],
        extra_fp32_nodes: Sequence[str] = (),
        *,
        fp32_blocks: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Write an INT8 copy keeping ``extra_fp32_nodes`` (the nodes of ``fp32_blocks``, named in
        the recipe) fp32 too; spec metadata and the recipe copied in, checked, atomic. Returns the recipe."""
        import contextlib
        import io
        import tempfile

        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        int8_path = Path(int8_path)
        excluded = sorted(set(self.base_fp32_nodes) | set(extra_fp32_nodes))
        quant_types = {ActivationType.UINT8: QuantType.QUInt8, ActivationType.INT8: QuantType.QInt8}
        reader = calibration_reader(
            self.calibration_paths, self.spec, self.config.calibration_batch_size, self.progress
        )
        with tempfile.TemporaryDirectory(prefix=".quantize.", dir=int8_path.parent) as tmp:
            quantized = Path(tmp, "int8.onnx")
            with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print per batch
                quantize_static(
                    str(self.prepared),
                    str(quantized),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=self.config.per_channel,
                    reduce_range=self.reduce_range,
                    activation_type=quant_types[self.activation],
                    weight_type=QuantType.QInt8,
                    calibrate_method=_ORT_METHODS[self.config.calibrate_method](),
                    nodes_to_exclude=excluded,
                    # one batch per collect: bounded memory
                    extra_options={"CalibStridedMinMax": 1, **calibration_options(self.config)},
                    calibration_cache_path=str(self.cache),
                )
            recipe = self.recipe(excluded, fp32_blocks)
            _finish_int8_file(self.fp32_path, quantized, int8_path, recipe)
        return recipe

    def recipe(self, fp32_nodes: list[str], fp32_blocks: Sequence[str] = ()) -> dict[str, Any]:
        """What :meth:`build` made, with the CPU it was made for (the INT8 file's metadata)."""
        from kidney_edge.runtime.hardware import cpu_kind

        return {
            "format": "QDQ",
            "activation_type": self.activation.value,
            "weight_type": "int8",
            "per_channel": self.config.per_channel,
            "reduce_range": self.reduce_range,
            "calibrate_method": self.config.calibrate_method.value,
            **calibration_options(self.config),
            "calibration_images": len(self.calibration_paths),
            "pre_process": self.config.pre_process,
            "fp32_layers": [layer.value for layer in self.config.fp32_layers],
            "fp32_nodes": fp32_nodes,
            "fp32_blocks": list(fp32_blocks),  # blocks the repair loop kept fp32 (kidney_edge.int8_repair)
            "cpu": cpu_kind(),  # reduce_range and the speed it was chosen for follow this CPU
        }


def quantize_model(
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    calibration_paths: Sequence[Path],
    spec: ModelSpec,
    config: QuantizationConfig = QuantizationConfig(),
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write a QDQ INT8 copy of ``fp32_path`` calibrated on ``calibration_paths``; returns the
    recipe. One :class:`Int8Builder` build, its calibration cache discarded."""
    import tempfile

    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory(prefix=".quantize.", dir=int8_path.parent) as tmp:
        builder = Int8Builder(fp32_path, calibration_paths, spec, config, Path(tmp), progress=progress)
        return builder.build(int8_path)


def calibration_options(config: QuantizationConfig) -> dict[str, Any]:
    """quantize_static's ``extra_options`` that set the config's calibration (onnxruntime's
    names); the recipe records them."""
    options: dict[str, Any] = {}
    if config.calibrate_method is CalibrationMethod.PERCENTILE:
        options["CalibPercentile"] = config.calibration_percentile
    if config.moving_average:
        options["CalibMovingAverage"] = True
    return options


_ORT_METHODS: dict[CalibrationMethod, Callable[[], Any]] = {
    CalibrationMethod.MINMAX: lambda: _ort_method("MinMax"),
    CalibrationMethod.PERCENTILE: lambda: _ort_method("Percentile"),
    CalibrationMethod.ENTROPY: lambda: _ort_method("Entropy"),
}


def _ort_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod as OrtCalibrationMethod

    return OrtCalibrationMethod[name]


def prepare_for_quantization(
    fp32_path: str | os.PathLike[str], prepared: str | os.PathLike[str], config: QuantizationConfig
) -> list[str]:
    """Write the graph quantize_static starts from to ``prepared`` (``quant_pre_process``'d when
    the config says so, every node named) and return the nodes that stay fp32: the head (see
    :func:`_head_node_names`) and the config's ``fp32_layers``."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if config.pre_process:
        quant_pre_process(str(fp32_path), str(prepared))
    model = onnx.load(str(prepared if config.pre_process else fp32_path))
    _name_unnamed_nodes(model)
    onnx.save(model, str(prepared))
    layers = layer_node_names(model, config.fp32_layers)
    return sorted(set(_head_node_names(model)) | set(layers) | set(config.fp32_nodes))


def _finish_int8_file(fp32_path: Path, quantized: Path, int8_path: Path, recipe: dict[str, Any]) -> None:
    """Copy the spec metadata onto the quantized graph, check it, write it atomically."""
    import json

    import onnx

    from kidney_edge.io_utils import atomic_write_bytes

    source = onnx.load(str(fp32_path), load_external_data=False)
    model = onnx.load(str(quantized))
    del model.metadata_props[:]
    for prop in source.metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    model.metadata_props.add(key="kidney_edge.quantization", value=json.dumps(recipe, sort_keys=True))
    model.producer_name, model.producer_version = source.producer_name, source.producer_version
    model.doc_string = source.doc_string + " INT8 (QDQ, per-channel weights)."
    onnx.checker.check_model(model, full_check=True)
    atomic_write_bytes(int8_path, model.SerializeToString())
    log.info(
        "wrote %s (%s activations, %s calibration)",
        int8_path,
        recipe["activation_type"],
        recipe["calibrate_method"],
    )


def require_quantization_tools() -> None:
    """Fail early, with the fix, when the ``train`` extra (onnx) is missing."""
    try:
        import onnx  # noqa: F401
        from onnxruntime.quantization import quantize_static  # noqa: F401
    except ImportError as exc:
        raise KidneyEdgeError(
            f"INT8 export needs the train extra ({exc}): pip install 'kidney-edge[train]'"
        ) from None
