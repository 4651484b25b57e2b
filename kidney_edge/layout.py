"""What a training run folder holds: the names `kidney-edge train` writes and export, evaluate,
the report and the demo read.

``MODELS_ROOT/<run>/`` holds the checkpoints, the run's splits and their audit, the spec and
config it ran with, the per-epoch history and the test evaluation (metrics, predictions,
report, model card). The export folder's names live in :mod:`kidney_edge.runtime.layout`
(the runtime reads them and may import nothing outside its layer); the OOD detector's
``ood.npz`` is named by :data:`kidney_edge.ood.OOD_FILE`, beside the checkpoint it was fitted for.
Numpy- and torch-free: the CLI and the runtime-free layers import it.
"""

from __future__ import annotations

from pathlib import Path

MODELS_ROOT = Path("models")  # `kidney-edge train` writes MODELS_ROOT/<run name>/ without --out

BEST_CHECKPOINT = "best.pt"  # the epoch with the best validation macro-F1: what export and evaluate take
LAST_CHECKPOINT = "last.pt"  # the newest epoch with optimiser state: what --resume continues
SPLITS_FILE = "splits.csv"  # path, label, split, group, sha256 per image
AUDIT_SUFFIX = "_audit.json"  # any splits CSV's leakage audit sits beside it: splits.csv -> splits_audit.json
SPLITS_AUDIT_FILE = Path(SPLITS_FILE).stem + AUDIT_SUFFIX
SPEC_FILE = "spec.json"  # the model spec, also inside every checkpoint
CONFIG_FILE = "config.json"  # the options the run was started with, plus what it derived
HISTORY_FILE = "history.csv"  # one row per finished epoch

# What an evaluation writes into its folder (the run folder, for the test split at the end of training).
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
REPORT_HTML_FILE = "report.html"
REPORT_MD_FILE = "report.md"
MODEL_CARD_FILE = "model_card.md"
