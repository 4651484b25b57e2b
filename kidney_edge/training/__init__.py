"""Two-phase transfer learning: frozen-backbone head training, then fine-tuning of the last blocks.

Public API: :class:`TrainConfig`, :class:`PhaseConfig`, :func:`train` -> :class:`TrainResult`.
Module map: ``config`` (frozen configs, events), ``data`` (splits, dataset, augmentation, class
weights), ``loop`` (one phase: epochs, validation, checkpoints), ``distributed`` (torchrun),
``trainer`` (the run from splits to test metrics).
"""

from __future__ import annotations

from typing import Any

from kidney_edge.training.config import PhaseConfig, TrainConfig, TrainEvent, TrainResult

__all__ = ["PhaseConfig", "TrainConfig", "TrainEvent", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    # `train` pulls in torch; the configs do not, so the CLI can read their defaults cheaply.
    if name == "train":
        from kidney_edge.training.trainer import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
