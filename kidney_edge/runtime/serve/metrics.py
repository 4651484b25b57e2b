"""Counters and histograms of the service, rendered in the Prometheus text exposition format 0.0.4.

Hand-written (a few dozen lines) instead of a client library: the edge install stays small.
Format: https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "kidney_edge"
# Request latency from ~1 image at batch 1 on a fast CPU up to a long queue on a slow one.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = (*labels, *extra)
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts: dict[Labels, list[int]] = defaultdict(lambda: [0] * (len(self.buckets) + 1))
        self.sums: dict[Labels, float] = defaultdict(float)

    def observe(self, labels: Labels, value: float) -> None:
        counts = self.counts[labels]
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                counts[index] += 1
        counts[-1] += 1  # +Inf
        self.sums[labels] += value

    def lines(self, name: str) -> list[str]:
        lines = []
        for labels, counts in sorted(self.counts.items()):
            for bound, count in zip((*self.buckets, "+Inf"), counts, strict=True):
                le = bound if isinstance(bound, str) else _number(bound)
                lines.append(f"{name}_bucket{_labels(labels, (('le', le),))} {count}")
            lines.append(f"{name}_sum{_labels(labels)} {_number(self.sums[labels])}")
            lines.append(f"{name}_count{_labels(labels)} {counts[-1]}")
        return lines


class ServeMetrics:
    """What ``GET /metrics`` shows. Safe to update from any thread."""

    def __init__(self, model_info: Mapping[str, str]) -> None:
        self._lock = threading.Lock()
        self._model_info = tuple(sorted(model_info.items()))
        self._requests: dict[Labels, int] = defaultdict(int)
        self._predictions: dict[Labels, int] = defaultdict(int)
        self._request_seconds = _Histogram(LATENCY_BUCKETS_S)
        self._stage_seconds = _Histogram(LATENCY_BUCKETS_S)
        self._batch_sizes = _Histogram(BATCH_SIZE_BUCKETS)

    def observe_request(self, endpoint: str, outcome: str, seconds: float) -> None:
        with self._lock:
            self._requests[(("endpoint", endpoint), ("outcome", outcome))] += 1
            self._request_seconds.observe((("endpoint", endpoint),), seconds)

    def observe_image(self, label: str, stages: Mapping[str, float]) -> None:
        """One classified image: its label and the seconds of each stage (decode, queue, inference)."""
        with self._lock:
            self._predictions[(("label", label),)] += 1
            for stage, seconds in stages.items():
                self._stage_seconds.observe((("stage", stage),), seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self._batch_sizes.observe((), size)

    def requests(self, endpoint: str, outcome: str) -> int:
        with self._lock:
            return self._requests.get((("endpoint", endpoint), ("outcome", outcome)), 0)

    def render(self, in_flight: int) -> str:
        p = PREFIX
        with self._lock:
            lines = [
                f"# HELP {p}_model_info The model being served (value always 1).",
                f"# TYPE {p}_model_info gauge",
                f"{p}_model_info{_labels(self._model_info)} 1",
                f"# HELP {p}_requests_total HTTP requests by endpoint and outcome.",
                f"# TYPE {p}_requests_total counter",
                *(f"{p}_requests_total{_labels(k)} {v}" for k, v in sorted(self._requests.items())),
                f"# HELP {p}_request_duration_seconds Time from request to response, by endpoint.",
                f"# TYPE {p}_request_duration_seconds histogram",
                *self._request_seconds.lines(f"{p}_request_duration_seconds"),
                f"# HELP {p}_stage_duration_seconds Per image: decode, queue (waiting for a batch), inference.",
                f"# TYPE {p}_stage_duration_seconds histogram",
                *self._stage_seconds.lines(f"{p}_stage_duration_seconds"),
                f"# HELP {p}_batch_size Images per ONNX call (dynamic batching).",
                f"# TYPE {p}_batch_size histogram",
                *self._batch_sizes.lines(f"{p}_batch_size"),
                f"# HELP {p}_predictions_total Classified images by label.",
                f"# TYPE {p}_predictions_total counter",
                *(f"{p}_predictions_total{_labels(k)} {v}" for k, v in sorted(self._predictions.items())),
                f"# HELP {p}_in_flight Images admitted and not yet answered.",
                f"# TYPE {p}_in_flight gauge",
                f"{p}_in_flight {in_flight}",
            ]
        return "\n".join(lines) + "\n"
