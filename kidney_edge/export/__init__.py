"""Export a trained model to ONNX with its spec inside, prove parity with PyTorch, add INT8.

``export_model(RUN_OR_CHECKPOINT, OUT)`` writes ``OUT/model.onnx`` (input ``input`` float32
(N, 3, S, S) with a dynamic batch axis; outputs ``logits``, ``probabilities`` =
softmax(logits / spec.temperature), ``features`` (N, F) pooled penultimate features and
``block_stats`` (N, T) channel statistics of three backbone blocks and ``cam`` (N, C, h, w)
class activation maps), checks PyTorch against onnxruntime on real
preprocessed test images at a batch size other than the export's, then (by default) writes
``OUT/model.int8.onnx`` and keeps it only when it passes the accuracy gate. The run's OOD
detector goes into both files' metadata, each with a threshold chosen on its own validation
scores. All figures go to ``OUT/parity.json``.

Modules, in the order an export runs through them: :mod:`~kidney_edge.export.config` (options
and result), :mod:`~kidney_edge.export.selection` (source, output folder, images),
:mod:`~kidney_edge.export.onnx_graph` (PyTorch -> ONNX) with :mod:`~kidney_edge.export.metadata`,
:mod:`~kidney_edge.export.parity`, :mod:`~kidney_edge.export.int8`,
:mod:`~kidney_edge.export.ood_graph` (the OOD detector in each file) and
:mod:`~kidney_edge.export.pipeline` (:func:`export_model`). This package re-exports their
public names.
"""

from kidney_edge.export.config import MIN_OPSET, ExportConfig, Exporter, ExportResult, Progress
from kidney_edge.export.metadata import set_metadata
from kidney_edge.export.onnx_graph import EXPORT_BATCH_SIZE, export_onnx, load_checked_model, onnx_module
from kidney_edge.export.ood_graph import append_ood_nodes
from kidney_edge.export.parity import MAX_ABS_DIFF_PROBABILITIES, MIN_ARGMAX_AGREEMENT, check_parity
from kidney_edge.export.pipeline import export_model
from kidney_edge.export.selection import EvaluationImages, default_out_dir, resolve_source, select_images

_append_ood_nodes = append_ood_nodes  # the name tests/test_ood.py imports
__all__ = [
    "EXPORT_BATCH_SIZE",
    "MAX_ABS_DIFF_PROBABILITIES",
    "MIN_ARGMAX_AGREEMENT",
    "MIN_OPSET",
    "EvaluationImages",
    "ExportConfig",
    "ExportResult",
    "Exporter",
    "Progress",
    "append_ood_nodes",
    "check_parity",
    "default_out_dir",
    "export_model",
    "export_onnx",
    "load_checked_model",
    "onnx_module",
    "resolve_source",
    "select_images",
    "set_metadata",
]
