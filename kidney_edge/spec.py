"""The model spec: the one record that decides how pixels become a prediction.

It travels with every artifact: inside checkpoints (as plain data), inside every ONNX file's
``metadata_props`` (key :data:`ONNX_METADATA_KEY`) and in every report. Preprocessing,
calibration and the decision rule are all read from it; nothing re-derives them elsewhere.
numpy only: the edge runtime imports this module.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from kidney_edge.errors import InputError

# 2: ModelSpec.positive_class; a threshold rule only adds positive calls. Version-1 specs load
# and are read under the version-2 rule (see DecisionRule.decide).
SPEC_SCHEMA_VERSION = 2
ONNX_METADATA_KEY = "kidney_edge.spec"
# Sorted sub-folder names of the Kaggle dataset; also its kidneyData.csv `target` order.
DEFAULT_CLASS_NAMES = ("Cyst", "Normal", "Stone", "Tumor")
# The finding a missed call costs most: reported first, protected by the decision rule and the
# INT8 gate. Everything else reads it from ModelSpec.positive_class.
DEFAULT_POSITIVE_CLASS = "Tumor"
# The label of an input the model's OOD detector rejects: not one of its classes.
UNKNOWN_LABEL = "unknown"
# Output names of an exported graph, in order (older exports have the first two): raw scores,
# softmax(logits / temperature), pooled penultimate features, channel statistics of a few
# backbone blocks (what the OOD detector scores), class activation maps.
LOGITS, PROBABILITIES, FEATURES, BLOCK_STATS, CAM = (
    "logits",
    "probabilities",
    "features",
    "block_stats",
    "cam",
)
GRAPH_OUTPUTS = (LOGITS, PROBABILITIES, FEATURES, BLOCK_STATS, CAM)
# An output export appends when the OOD detector is computed inside the graph (Mahalanobis-type
# detectors): (N,) float32 scores, higher = more foreign.
OOD_SCORE = "ood_score"
# EfficientNet-Lite0's TF-ported ImageNet weights expect (x - 127) / 128 on 0..255 pixels.
LITE0_MEAN = (127.0, 127.0, 127.0)
LITE0_STD = (128.0, 128.0, 128.0)


class ResizeRule(str, Enum):
    """How a decoded image of any shape becomes ``input_size`` x ``input_size``."""

    STRETCH = "stretch"  # resize both sides, ignoring aspect ratio
    LETTERBOX = "letterbox"  # keep aspect ratio, pad with black (air in CT) to a square
    CENTER_CROP = "center_crop"  # keep aspect ratio, resize the short side, crop the centre


class RegionRule(str, Enum):
    """Which part of a decoded slice the model sees, before the resize rule (kidney_edge.regions)."""

    WHOLE = "whole"  # the image as decoded
    KIDNEYS = "kidneys"  # the band about the spine that holds both kidneys; the whole where not found

    @property
    def description(self) -> str:
        """The rule in words, for readers of a model card (report card, serve's ``/v1/model``)."""
        if self is RegionRule.KIDNEYS:
            return "the band about the spine that holds both kidneys (the whole image where none is found)"
        return "the whole slice"


class ColorMode(str, Enum):
    """What the image is reduced to before the 3 input channels are filled."""

    GRAY = "gray"  # CT is grayscale: decode luminance, replicate into all channels
    RGB = "rgb"  # keep colour channels as stored


@dataclass(frozen=True)
class CTWindow:
    """Hounsfield window applied to DICOM CT: values in [level - width/2, level + width/2] span 0..255."""

    level: float = 40.0  # soft-tissue / kidney window
    width: float = 400.0

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise InputError(f"CT window width must be > 0 (got {self.width}); e.g. --window 40,400")


class RuleKind(str, Enum):
    """How class probabilities become one label."""

    ARGMAX = "argmax"  # the most probable class
    THRESHOLD = "threshold"  # argmax, plus the positive class wherever p(positive) >= threshold


@dataclass(frozen=True)
class DecisionRule:
    """How class probabilities become one label.

    ``argmax``: the most probable class. ``threshold``: the argmax label, except that
    ``positive_class`` is also chosen wherever its probability reaches ``threshold``. The rule
    only ever adds positive calls, so its positive recall is never below argmax's. An argmax
    rule may still name ``positive_class`` and ``target_recall``: argmax alone met that target
    on validation. ``note`` says how the operating point was chosen, in words.
    """

    kind: str = RuleKind.ARGMAX.value
    positive_class: str | None = None
    threshold: float | None = None
    target_recall: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", RuleKind(self.kind).value)
        except ValueError:
            raise InputError(
                f"decision rule kind must be 'argmax' or 'threshold', got {self.kind!r}"
            ) from None
        if self.kind == RuleKind.THRESHOLD:
            if self.positive_class is None or self.threshold is None:
                raise InputError("a 'threshold' decision rule needs positive_class and threshold")
            if not 0.0 <= self.threshold <= 1.0:
                raise InputError(f"decision threshold must be in [0, 1], got {self.threshold}")

    def describe(self) -> str:
        """The rule in words, as `info`, reports and headlines print it."""
        if self.kind == RuleKind.THRESHOLD:
            text = f"{self.positive_class} if argmax is {self.positive_class} or p({self.positive_class}) >= {self.threshold:.4f}, else argmax"
        elif self.positive_class and self.target_recall is not None:
            text = f"argmax (it meets {self.positive_class} recall {self.target_recall:g} on validation)"
        else:
            text = "argmax"
        return f"{text}; {self.note}" if self.note else text

    def decide(self, probabilities: np.ndarray, class_names: tuple[str, ...]) -> np.ndarray:
        """(N, C) probabilities -> (N,) int64 class indices."""
        probabilities = np.asarray(probabilities)
        labels = probabilities.argmax(axis=1).astype(np.int64)
        if self.kind == RuleKind.THRESHOLD:
            positive = class_names.index(self.positive_class)
            labels[probabilities[:, positive] >= self.threshold] = positive
        return labels


def _scaled(logits: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float64 logits / temperature and their (N, 1) row maxima (for stable exponentials)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return z, z.max(axis=1, keepdims=True)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N, C) float64 probabilities of softmax(logits / temperature), stable."""
    z, z_max = _scaled(logits, temperature)
    e = np.exp(z - z_max)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N, C) float64 log-probabilities of softmax(logits / temperature).

    Computed as z - logsumexp(z), so confident wrong predictions give large finite values
    rather than log(0).
    """
    z, z_max = _scaled(logits, temperature)
    return z - (z_max + np.log(np.exp(z - z_max).sum(axis=1, keepdims=True)))


def _as_tuple3(value: Any, name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise InputError(f"spec field {name!r} needs 3 values (one per channel), got {len(values)}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to turn a file into a prediction, serialisable to JSON.

    ``mean``/``std`` are on the 0..255 pixel scale: input = (pixel - mean) / std, channels in
    ``channel_order``, layout NCHW float32.
    """

    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    arch: str = "efficientnet_lite0"
    input_size: int = 224
    resize: ResizeRule = ResizeRule.LETTERBOX
    region: RegionRule = RegionRule.WHOLE
    color_mode: ColorMode = ColorMode.GRAY
    channel_order: str = "RGB"
    mean: tuple[float, float, float] = LITE0_MEAN
    std: tuple[float, float, float] = LITE0_STD
    ct_window: CTWindow = field(default_factory=CTWindow)
    decision_rule: DecisionRule = field(default_factory=DecisionRule)
    positive_class: str | None = DEFAULT_POSITIVE_CLASS
    temperature: float = 1.0
    toolkit_version: str = ""
    data_fingerprint: str | None = None
    schema_version: int = SPEC_SCHEMA_VERSION

    def __post_init__(self) -> None:
        # Normalise types so a spec built from JSON equals one built in code.
        set_ = object.__setattr__
        set_(self, "class_names", tuple(str(c) for c in self.class_names))
        set_(self, "mean", _as_tuple3(self.mean, "mean"))
        set_(self, "std", _as_tuple3(self.std, "std"))
        if not self.toolkit_version:
            from kidney_edge import __version__

            set_(self, "toolkit_version", __version__)
        try:
            set_(self, "resize", ResizeRule(self.resize))
            set_(self, "region", RegionRule(self.region))
            set_(self, "color_mode", ColorMode(self.color_mode))
        except ValueError as exc:
            raise InputError(f"invalid spec: {exc}") from None
        if self.positive_class is not None and self.positive_class not in self.class_names:
            if self.positive_class != DEFAULT_POSITIVE_CLASS:
                raise InputError(
                    f"positive class {self.positive_class!r} is not one of {list(self.class_names)}"
                )
            set_(self, "positive_class", None)  # classes without a Tumor: no positive class
        self._validate()

    def _validate(self) -> None:
        if len(self.class_names) < 2:
            raise InputError(f"a spec needs at least 2 classes, got {list(self.class_names)}")
        if UNKNOWN_LABEL in self.class_names:
            raise InputError(
                f"{UNKNOWN_LABEL!r} is reserved for inputs the OOD detector rejects; rename that class"
            )
        if len(set(self.class_names)) != len(self.class_names):
            raise InputError(f"class names must be unique, got {list(self.class_names)}")
        if not 16 <= int(self.input_size) <= 2048:
            raise InputError(f"input size must be in 16..2048 (--image-size), got {self.input_size}")
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(f"channel order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if any(s <= 0 for s in self.std):
            raise InputError(f"std values must be > 0, got {self.std}")
        if not self.temperature > 0:
            raise InputError(f"calibration temperature must be > 0, got {self.temperature}")
        rule = self.decision_rule
        if rule.kind == "threshold" and rule.positive_class not in self.class_names:
            raise InputError(
                f"decision rule class {rule.positive_class!r} is not one of {list(self.class_names)}"
            )
        if self.schema_version > SPEC_SCHEMA_VERSION:
            raise InputError(
                f"spec schema version {self.schema_version} is newer than this kidney-edge "
                f"understands ({SPEC_SCHEMA_VERSION}); upgrade kidney-edge"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Temperature-scaled softmax: (N, C) logits -> (N, C) float32 probabilities."""
        return softmax(logits, self.temperature).astype(np.float32)

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """(N, C) probabilities -> (N,) class indices under this spec's decision rule."""
        return self.decision_rule.decide(probabilities, self.class_names)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["class_names"] = list(self.class_names)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        data["resize"], data["color_mode"] = self.resize.value, self.color_mode.value
        # Written only where it crops, so a whole-slice model stays readable by a kidney-edge that
        # predates the field (it refuses unknown fields by name).
        if self.region is RegionRule.WHOLE:
            del data["region"]
        else:
            data["region"] = self.region.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if not isinstance(data, dict):
            raise InputError(f"a spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown spec fields {unknown}; this kidney-edge knows {sorted(known)}")
        values = dict(data)
        try:
            if isinstance(values.get("ct_window"), dict):
                values["ct_window"] = CTWindow(**values["ct_window"])
            if isinstance(values.get("decision_rule"), dict):
                values["decision_rule"] = DecisionRule(**values["decision_rule"])
            return cls(**values)
        except TypeError as exc:
            raise InputError(f"invalid spec: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"spec is not valid JSON: {exc}") from None
        return cls.from_dict(data)
