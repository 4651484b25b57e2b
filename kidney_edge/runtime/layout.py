"""What an export folder holds: the names `kidney-edge export` writes and the runtime reads.

``EXPORT_ROOT/<run>/MODEL_FILE``, with ``INT8_FILE`` and ``PARITY_FILE`` beside it. The names
live in the runtime package because the runtime reads them and may import nothing of the
training layers; the run folder that training writes is named in :mod:`kidney_edge.layout`.
"""

from __future__ import annotations

from pathlib import Path

EXPORT_ROOT = Path("export")  # `kidney-edge export RUN` writes EXPORT_ROOT/<run name>/ without --out
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REJECTED_INT8_FILE = (
    "model.int8.rejected.onnx"  # failed the gate at export: kept for inspection, never loaded
)
PARITY_FILE = "parity.json"  # parity figures, and in its "int8" section the INT8 accuracy gate record

# Staging names: a graph lives under one of these until its check passes, so nothing that loads
# MODEL_FILE or INT8_FILE ever sees an unverified graph.
UNVERIFIED_MODEL_FILE = "model.unverified.onnx"
PARITY_FAILED_MODEL_FILE = "model.parity_failed.onnx"  # kept for inspection when parity fails
UNVERIFIED_INT8_FILE = "model.int8.unverified.onnx"
