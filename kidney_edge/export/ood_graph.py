"""The OOD detector in an exported file: chosen per file (threshold on that file's own val
scores, refitted for INT8), then appended to the graph as ``ood_score`` nodes where its method
allows, else carried in metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kidney_edge.errors import EmptySplitError
from kidney_edge.export.config import ExportResult, Progress
from kidney_edge.export.metadata import set_metadata
from kidney_edge.ood import ONNX_OOD_KEY, OOD_FILE, OodDetector
from kidney_edge.spec import OOD_SCORE

if TYPE_CHECKING:
    from kidney_edge.labelled import LabelledSplits

log = logging.getLogger(__name__)


def run_detector(checkpoint: Path) -> OodDetector | None:
    """The detector the training run fitted (``ood.npz`` beside its checkpoint), if any."""
    sidecar = checkpoint.parent / OOD_FILE
    return OodDetector.from_bytes(sidecar.read_bytes(), where=str(sidecar)) if sidecar.is_file() else None


def file_detector(
    onnx_path: Path,
    detector: OodDetector | None,
    splits: LabelledSplits | None,
    result: ExportResult,
    progress: Progress | None,
    *,
    refit: bool = False,
) -> OodDetector | None:
    """The detector for ``onnx_path``, its threshold chosen on this file's own val scores. The fp32
    file keeps the run's ``detector`` (it reproduces the features that was fitted on); with
    ``refit`` (the INT8 file, whose quantized statistics shift) or without a detector (the
    default method) it is fitted on this file's own train outputs."""
    from kidney_edge.evaluation import model_ood_detector

    if splits is None:
        result.warnings.append(
            "no OOD detector: it is fitted on the run's train and val splits; export a run folder "
            "or pass --splits RUN/splits.csv"
        )
        return None
    if progress is not None:
        progress(f"ood ({onnx_path.name})", 0, 1)
    try:
        return model_ood_detector(onnx_path, splits, detector, refit=refit)
    except EmptySplitError as exc:
        result.warnings.append(f"no OOD detector: {exc}")
        return None


def install_ood(onnx_path: Path, detector: OodDetector, splits: LabelledSplits) -> OodDetector:
    """Write ``detector`` into ``onnx_path``: as graph nodes computing ``ood_score`` when its
    method allows (onnxruntime then scores it with the model's own threads, and other runtimes
    get the score too), with the threshold re-chosen on the graph's own val scores; else as
    metadata for the runtime's numpy scorer. Returns the detector as installed."""
    from kidney_edge.evaluation import model_ood_detector

    if not detector.graph_computable:
        set_metadata(onnx_path, {ONNX_OOD_KEY: detector.to_metadata()})
        return detector
    append_ood_nodes(onnx_path, detector)
    carried = detector.moved_into_graph()
    set_metadata(onnx_path, {ONNX_OOD_KEY: carried.to_metadata()})
    carried = model_ood_detector(onnx_path, splits, carried)  # scored by the graph's own output
    set_metadata(onnx_path, {ONNX_OOD_KEY: carried.to_metadata()})
    log.info("%s: OOD detector %s", onnx_path.name, carried.describe())
    return carried


def append_ood_nodes(onnx_path: Path, detector: OodDetector) -> None:
    """Append min over classes of ||input @ whitening - whitened_mean||^2 as output ``ood_score``.

    The whitening matrix is stored as float16 (the detector holds float16-rounded values, so no
    precision is lost) and cast to float32 once, when onnxruntime folds constants.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kidney_edge.io_utils import atomic_write_bytes

    proto = onnx.load(str(onnx_path))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    whitening = detector.params["whitening"].astype(np.float16)  # (D, D)
    means = detector.params["whitened_means"].astype(np.float32)  # (C, D)
    graph = proto.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(whitening, "ood_whitening_f16"),
            numpy_helper.from_array(means[None], "ood_means"),  # (1, C, D)
            numpy_helper.from_array(np.array([1], np.int64), "ood_axis_1"),
            numpy_helper.from_array(np.array([2], np.int64), "ood_axis_2"),
        ]
    )

    def reduce(op: str, source: str, target: str, axis: int) -> Any:
        if opset >= 18:  # axes became an input in opset 18
            return helper.make_node(op, [source, f"ood_axis_{axis}"], [target], keepdims=0, name=target)
        return helper.make_node(op, [source], [target], axes=[axis], keepdims=0, name=target)

    graph.node.extend(
        [
            helper.make_node(
                "Cast", ["ood_whitening_f16"], ["ood_whitening"], to=TensorProto.FLOAT, name="ood_cast"
            ),
            helper.make_node(
                "MatMul", [detector.input_name, "ood_whitening"], ["ood_whitened"], name="ood_whiten"
            ),
            helper.make_node(
                "Unsqueeze", ["ood_whitened", "ood_axis_1"], ["ood_whitened_3d"], name="ood_unsqueeze"
            ),
            helper.make_node(
                "Sub", ["ood_whitened_3d", "ood_means"], ["ood_difference"], name="ood_difference"
            ),
            reduce("ReduceSumSquare", "ood_difference", "ood_squared", 2),  # (N, C)
            reduce("ReduceMin", "ood_squared", OOD_SCORE, 1),  # (N,)
        ]
    )
    graph.output.append(helper.make_tensor_value_info(OOD_SCORE, TensorProto.FLOAT, ["batch"]))
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(onnx_path, proto.SerializeToString())
