"""Fitting the out-of-distribution ("unknown") detectors of a trained classifier.

The detector itself, its scores and its travel inside an ONNX file are the runtime's
(:mod:`kidney_edge.runtime.ood`, numpy only); this module fits a method's arrays on training
outputs and chooses the threshold on validation outputs, so that at most a stated share of
in-distribution images is rejected. For a training run the detector is saved as
:data:`OOD_FILE` beside the checkpoint. Fitting uses scikit-learn's Ledoit-Wolf covariance and
scipy's Wilson interval, imported where they are used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from kidney_edge.errors import InputError, enum_choice
from kidney_edge.runtime.ood import (
    CONFIDENCE,
    DEFAULT_MAX_ID_REJECTION,
    HALF_PRECISION_SIZE,
    METHOD_INPUT,
    ONNX_OOD_KEY,
    OodDetector,
    OodMethod,
    normalised_rows,
)

# Training, evaluation and export import both halves from here: the runtime's names are re-exported.
__all__ = [
    "DEFAULT_MAX_ID_REJECTION",
    "DEFAULT_OOD_METHOD",
    "HALF_PRECISION_SIZE",
    "METHOD_INPUT",
    "ONNX_OOD_KEY",
    "OOD_FILE",
    "OodDetector",
    "OodMethod",
    "choose_threshold",
    "fit_detector",
    "fit_params",
    "with_threshold",
]

OOD_FILE = "ood.npz"  # beside a run's best.pt
KNN_NEIGHBOURS = 5  # k of the KNN score; OpenOOD's default k=50 assumes 50,000 training images
MAX_KNN_BANK = 4096  # training features the KNN detector keeps (evenly strided when more)
# Eigenvalues of the shrunk covariance are floored here before whitening divides by their root.
_MIN_EIGENVALUE = 1e-12
# The detector every run fits unless told otherwise: the only one that reached the targets in
# benchmarks/results/ood.md (penultimate-feature methods leave most foreign inputs in).
DEFAULT_OOD_METHOD = OodMethod.BLOCK_STATS


def fit_params(
    method: OodMethod | str, features: np.ndarray, labels: np.ndarray, n_classes: int
) -> dict[str, np.ndarray]:
    """The arrays ``method`` scores with, from (N, D) training values of its input (see
    :data:`METHOD_INPUT`) and (N,) class indices."""
    method = enum_choice(OodMethod, method, "--ood-method")
    return {
        name: _travel_precision(values) for name, values in _fit(method, features, labels, n_classes).items()
    }


def _travel_precision(values: np.ndarray) -> np.ndarray:
    """``values`` as a loaded detector will hold them (see :data:`HALF_PRECISION_SIZE`)."""
    if values.size >= HALF_PRECISION_SIZE:
        return values.astype(np.float16).astype(np.float32)
    return values


def _fit(
    method: OodMethod, features: np.ndarray, labels: np.ndarray, n_classes: int
) -> dict[str, np.ndarray]:
    if method in (OodMethod.MAHALANOBIS, OodMethod.BLOCK_STATS):
        return _fit_mahalanobis(np.asarray(features, dtype=np.float64), np.asarray(labels), n_classes)
    if method is OodMethod.KNN:
        bank = normalised_rows(features)
        stride = max(1, -(-len(bank) // MAX_KNN_BANK))
        return {"bank": bank[::stride].astype(np.float32), "k": np.array(KNN_NEIGHBOURS)}
    return {}


def _fit_mahalanobis(features: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    present = [c for c in range(n_classes) if np.any(labels == c)]
    means = np.stack([features[labels == c].mean(axis=0) for c in present])  # (C', D)
    centred = features - means[np.searchsorted(present, labels)]
    # A few hundred images against 1,280 dimensions: the plain covariance is singular, so it is
    # shrunk towards a scaled identity by the Ledoit-Wolf estimate (as in Lee et al.'s code).
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    # (D, D) with W W^T = cov^-1: distances after whitening are Mahalanobis distances
    whitening = eigenvectors / np.sqrt(np.maximum(eigenvalues, _MIN_EIGENVALUE))[None]
    return {
        "whitened_means": (means @ whitening).astype(np.float32),
        "whitening": whitening.astype(np.float32),
    }


def with_threshold(
    detector: OodDetector, val_scores: np.ndarray, max_id_rejection: float | None = None
) -> OodDetector:
    """``detector`` with its threshold chosen on in-distribution validation ``val_scores``
    (target: ``max_id_rejection``, else the detector's own)."""
    target = detector.max_id_rejection if max_id_rejection is None else max_id_rejection
    threshold = choose_threshold(val_scores, target)
    rejected = float(np.mean(np.asarray(val_scores) > threshold)) if len(val_scores) else None
    return dataclasses.replace(
        detector, threshold=threshold, max_id_rejection=target, val_rejection=rejected, n_val=len(val_scores)
    )


def choose_threshold(val_scores: np.ndarray, max_id_rejection: float) -> float:
    """The lowest threshold whose validation rejection rate has a 95% Wilson upper bound at most
    ``max_id_rejection`` (scores above the threshold are rejected)."""
    from scipy.stats import binomtest

    if not 0.0 < max_id_rejection < 1.0:
        raise InputError(f"--ood-max-rejection must be in (0, 1), got {max_id_rejection}")
    scores = np.sort(np.asarray(val_scores, dtype=np.float64))[::-1]  # highest first
    n = len(scores)
    if n == 0:
        raise InputError("no validation images to choose the OOD threshold on")
    rejected = 0  # the largest count whose upper bound still meets the target
    for k in range(1, n):
        upper = binomtest(k, n).proportion_ci(CONFIDENCE, method="wilson").high
        if upper > max_id_rejection:
            break
        rejected = k
    if rejected == 0 and binomtest(0, n).proportion_ci(CONFIDENCE, method="wilson").high > max_id_rejection:
        return float(scores[0])  # too few images for the bound: reject nothing seen in validation
    return float(scores[rejected])  # the (rejected+1)-th highest: `rejected` scores lie above it


def fit_detector(
    method: OodMethod | str,
    train: tuple[Mapping[str, np.ndarray], np.ndarray],
    val: Mapping[str, np.ndarray],
    n_classes: int,
    max_id_rejection: float = DEFAULT_MAX_ID_REJECTION,
) -> OodDetector:
    """Fit ``method`` on ``train`` = (graph outputs by name, (N,) class indices), choose its
    threshold on the ``val`` outputs."""
    method = enum_choice(OodMethod, method, "--ood-method")
    train_outputs, train_labels = train
    params = fit_params(method, train_outputs[METHOD_INPUT[method]], train_labels, n_classes)
    detector = OodDetector(method, float("inf"), params, max_id_rejection, n_fit=len(train_labels))
    return with_threshold(detector, detector.score(val), max_id_rejection)
