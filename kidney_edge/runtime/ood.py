"""Out-of-distribution ("unknown") scoring on the edge: the numpy half of the OOD detectors.

A detector scores each image from one of the classifier's graph outputs (higher = more
foreign) and rejects scores above its threshold. It travels inside the ONNX file (metadata key
:data:`ONNX_OOD_KEY`, an ``.npz`` in base64); this module reads it back and scores with numpy
only, so the runtime needs neither scikit-learn nor scipy. Fitting a detector and choosing its
threshold is training's job: :mod:`kidney_edge.ood`.

Methods (scores after OpenOOD v1.5, Zhang et al. 2023, https://github.com/Jingkang50/OpenOOD):

- ``msp``: 1 - max softmax probability (Hendrycks & Gimpel 2017);
- ``energy``: -logsumexp(logits) (Liu et al. 2020);
- ``mahalanobis``: the smallest Mahalanobis distance to a class mean under one shared,
  shrunk covariance (Lee et al. 2018), computed as a squared distance after whitening;
- ``knn``: 1 - cosine similarity to the k-th nearest training feature (Sun et al. 2022);
- ``block_stats``: ``mahalanobis`` on the channel means and standard deviations of three
  backbone blocks (early, middle, last) instead of the penultimate features: Lee et al.'s
  multi-layer feature ensemble, with the channel moments of Sastry & Oore 2020.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from kidney_edge.errors import InputError, enum_choice
from kidney_edge.spec import BLOCK_STATS, FEATURES, LOGITS, OOD_SCORE

ONNX_OOD_KEY = "kidney_edge.ood"
# Share of in-distribution images the threshold may reject, as the upper end of the 95% Wilson
# interval of the validation rejection rate: a threshold set at the point estimate would reject
# more than the target on about half of all new data (validation sets hold a few hundred images).
DEFAULT_MAX_ID_REJECTION = 0.05
CONFIDENCE = 0.95
# Arrays this large travel as float16 (the whitening matrix of 1,024 block statistics: 4 MB ->
# 2 MB inside every ONNX file); they are rounded to float16 when fitted, so the threshold is
# chosen on exactly the scores a loaded detector computes.
HALF_PRECISION_SIZE = 1 << 16
_EPS = 1e-12


class OodMethod(str, Enum):
    """Post-hoc OOD scores (``--ood-method``)."""

    MSP = "msp"
    ENERGY = "energy"
    MAHALANOBIS = "mahalanobis"
    KNN = "knn"
    BLOCK_STATS = "block_stats"


# The graph output each method scores.
METHOD_INPUT = {
    OodMethod.MSP: LOGITS,
    OodMethod.ENERGY: LOGITS,
    OodMethod.MAHALANOBIS: FEATURES,
    OodMethod.KNN: FEATURES,
    OodMethod.BLOCK_STATS: BLOCK_STATS,
}
Params = Mapping[str, np.ndarray]


def normalised_rows(features: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float32 rows of unit length (the KNN bank and its queries)."""
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), _EPS)


def _score_msp(params: Params, logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return 1.0 - 1.0 / np.exp(z).sum(axis=1)  # 1 - max softmax = 1 - exp(0) / sum(exp(z - max))


def _score_energy(params: Params, logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z_max = z.max(axis=1)
    return -(z_max + np.log(np.exp(z - z_max[:, None]).sum(axis=1)))


def _score_mahalanobis(params: Params, features: np.ndarray) -> np.ndarray:
    whitened = np.asarray(features, dtype=np.float32) @ params["whitening"]  # (N, D): distances now Euclidean
    centres = params["whitened_means"]  # (C, D)
    squared = (
        (whitened**2).sum(axis=1, keepdims=True) - 2.0 * whitened @ centres.T + (centres**2).sum(axis=1)[None]
    )  # (N, C)
    return squared.min(axis=1).astype(np.float64)


def _score_knn(params: Params, features: np.ndarray) -> np.ndarray:
    similarity = normalised_rows(features) @ params["bank"].T  # (N, bank)
    k = min(int(params["k"]), similarity.shape[1])
    kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]  # k-th largest similarity
    return (1.0 - kth).astype(np.float64)


_SCORERS: dict[OodMethod, Callable[[Params, np.ndarray], np.ndarray]] = {
    OodMethod.MSP: _score_msp,
    OodMethod.ENERGY: _score_energy,
    OodMethod.MAHALANOBIS: _score_mahalanobis,
    OodMethod.KNN: _score_knn,
    OodMethod.BLOCK_STATS: _score_mahalanobis,
}


@dataclass(frozen=True)
class OodDetector:
    """A fitted detector: ``score`` is higher for more foreign inputs; ``rejects`` is score > threshold.

    ``val_rejection`` and ``n_val`` record the in-distribution validation images the threshold
    was chosen on; ``max_id_rejection`` the target it was chosen for.
    """

    method: OodMethod
    threshold: float
    params: dict[str, np.ndarray] = field(default_factory=dict, compare=False)
    max_id_rejection: float = DEFAULT_MAX_ID_REJECTION
    val_rejection: float | None = None
    n_val: int = 0
    n_fit: int = 0
    in_graph: bool = False  # the model graph computes the score (output OOD_SCORE); no params here

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", enum_choice(OodMethod, self.method, "--ood-method"))
        # float32 in memory: float16 matrix products are slow on CPUs
        params = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in self.params.items()}
        object.__setattr__(self, "params", params)

    @property
    def input_name(self) -> str:
        """The graph output this detector scores (see :data:`~kidney_edge.spec.GRAPH_OUTPUTS`)."""
        return METHOD_INPUT[self.method]

    def score(self, outputs: Mapping[str, np.ndarray | None]) -> np.ndarray:
        """Graph outputs by name (at least :attr:`input_name`, (N, D)) -> (N,) float64 scores,
        higher = more foreign."""
        if self.in_graph:
            if outputs.get(OOD_SCORE) is None:
                raise InputError(
                    f"this {self.method.value} OOD detector is computed by the model's `{OOD_SCORE}` output"
                )
            return np.asarray(outputs[OOD_SCORE], dtype=np.float64)
        values = outputs.get(self.input_name)
        if values is None:
            raise InputError(
                f"the {self.method.value} OOD detector scores the model's `{self.input_name}` output, "
                "which this model lacks; re-export it"
            )
        return _SCORERS[self.method](self.params, values)

    def rejects(self, scores: np.ndarray) -> np.ndarray:
        """(N,) scores -> (N,) bool: the inputs this detector calls unknown."""
        return np.asarray(scores) > self.threshold

    def describe(self) -> str:
        text = f"{self.method.value} score > {self.threshold:.6g} is unknown"
        if self.val_rejection is not None:
            text += (
                f" (rejects {self.val_rejection:.1%} of {self.n_val} validation images; "
                f"target <= {self.max_id_rejection:.0%} at 95% confidence)"
            )
        return text

    def record(self) -> dict[str, Any]:
        """The detector's facts without its arrays, for metrics.json, parity.json and `info`."""
        return {
            "method": self.method.value,
            "threshold": self.threshold,
            "max_id_rejection": self.max_id_rejection,
            "val_rejection": self.val_rejection,
            "n_val": self.n_val,
            "n_fit": self.n_fit,
            "in_graph": self.in_graph,
            "description": self.describe(),
        }

    def to_bytes(self) -> bytes:
        header = {k: v for k, v in self.record().items() if k != "description"}
        buffer = io.BytesIO()
        arrays = {
            k: v.astype(np.float16) if v.size >= HALF_PRECISION_SIZE else v for k, v in self.params.items()
        }
        np.savez_compressed(buffer, header=np.array(json.dumps(header)), **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "OOD detector") -> OodDetector:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                header = json.loads(str(archive["header"]))
                params = {name: archive[name] for name in archive.files if name != "header"}
            return cls(params=params, **header)
        except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{where} is not a valid kidney-edge OOD detector ({exc})") from None

    def to_metadata(self) -> str:
        return base64.b64encode(self.to_bytes()).decode("ascii")

    @classmethod
    def from_metadata(cls, text: str, where: str = "ONNX metadata") -> OodDetector:
        try:
            data = base64.b64decode(text.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise InputError(f"{where}: {ONNX_OOD_KEY} is not base64") from None
        return cls.from_bytes(data, where)

    def moved_into_graph(self) -> OodDetector:
        """This detector as carried by a graph that computes its score: the record without params."""
        return dataclasses.replace(self, params={}, in_graph=True)

    @property
    def graph_computable(self) -> bool:
        """Whether export can append this detector's score to the model graph (standard ops)."""
        return self.method in (OodMethod.MAHALANOBIS, OodMethod.BLOCK_STATS)
