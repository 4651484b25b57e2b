"""The edge runtime: exported models on onnxruntime, with no PyTorch anywhere on this path.

Modules import numpy, Pillow, onnxruntime (inside the functions that run a model) and the
spec / imaging / errors / io_utils layer only; the training, evaluation and export layers
import the runtime, never the reverse, not even inside a function (tests/test_import_graph.py
checks it). The two inputs only the ``train`` extra can read come in as functions from the
caller: ``benchmark --checkpoint`` (PyTorch eager figures, :mod:`kidney_edge.torch_bench`) and
``info`` on a ``.pt`` checkpoint (:func:`kidney_edge.checkpoint.describe_checkpoint`).

- :mod:`~kidney_edge.runtime.classifier`: :class:`OnnxClassifier` (spec from the file's
  metadata, batches of files through one session), the INT8 check, the default model.
- :mod:`~kidney_edge.runtime.predict`: ``predict`` on a folder and the predictions schema.
- :mod:`~kidney_edge.runtime.benchmark`: ``benchmark``, model-only and end to end.
- :mod:`~kidney_edge.runtime.describe`: ``info`` on ONNX files, checkpoints and images.
- :mod:`~kidney_edge.runtime.ood`: the OOD detector an ONNX file carries, scored with numpy.
- :mod:`~kidney_edge.runtime.hardware`: usable CPUs and the CPU's instruction sets.
- :mod:`~kidney_edge.runtime.precision`: fp32 or INT8 from an export folder, chosen on this CPU.
"""

from __future__ import annotations

from kidney_edge.runtime.benchmark import (
    BenchmarkConfig,
    latency_stats,
    machine_info,
    model_variants,
    parse_int_list,
    run_benchmark,
)
from kidney_edge.runtime.classifier import (
    EXPORT_ROOT,
    INT8_FILE,
    INT8_OPS,
    MODEL_FILE,
    OnnxClassifier,
    find_default_model,
    int8_operators,
    is_int8_model,
    session_options,
)
from kidney_edge.runtime.describe import describe_file, describe_onnx
from kidney_edge.runtime.hardware import CpuInfo, available_cpus, cpu_info, cpu_isa
from kidney_edge.runtime.precision import Precision, PrecisionChoice, resolve_precision
from kidney_edge.runtime.predict import (
    Classified,
    ExecutionLayout,
    PredictOptions,
    classify,
    classify_paths,
    execution_layout,
    predict_folder,
    scan_images,
)
from kidney_edge.runtime.rows import (
    EXIT_NOTHING_READ,
    EXIT_OK,
    EXIT_SERVER,
    EXIT_SOME_FAILED,
    OutputFormat,
    PredictSummary,
    format_predictions,
    output_columns,
    prediction_rows,
)

__all__ = [
    "EXIT_NOTHING_READ",
    "EXIT_OK",
    "EXIT_SERVER",
    "EXIT_SOME_FAILED",
    "EXPORT_ROOT",
    "INT8_FILE",
    "INT8_OPS",
    "MODEL_FILE",
    "BenchmarkConfig",
    "Classified",
    "CpuInfo",
    "ExecutionLayout",
    "OnnxClassifier",
    "OutputFormat",
    "PredictOptions",
    "Precision",
    "PrecisionChoice",
    "PredictSummary",
    "available_cpus",
    "classify",
    "classify_paths",
    "cpu_info",
    "cpu_isa",
    "describe_file",
    "describe_onnx",
    "execution_layout",
    "find_default_model",
    "format_predictions",
    "int8_operators",
    "is_int8_model",
    "latency_stats",
    "machine_info",
    "model_variants",
    "output_columns",
    "parse_int_list",
    "predict_folder",
    "prediction_rows",
    "resolve_precision",
    "run_benchmark",
    "scan_images",
    "session_options",
]
