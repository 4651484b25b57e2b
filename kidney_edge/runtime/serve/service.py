"""The serving core, free of any web framework: admit, decode, batch, classify, answer.

Every answer comes from :func:`~kidney_edge.runtime.predict.classify`, the chain
``predict`` runs (preprocess -> ONNX -> calibrated probabilities -> OOD check -> decision rule),
so a file gets the same row here as in a predictions CSV. Uploads are decoded in memory and
brought to the model's view by :func:`~kidney_edge.imaging.load_image` and
:func:`~kidney_edge.imaging.to_view` (the spec's region and resize rules), the steps
``preprocess`` itself runs, in a small thread pool while the previous batch runs; the batch then
only normalises them (``classify(..., views=True)``), so its rows equal predict's. The images
are batched by the :class:`~kidney_edge.runtime.serve.batcher.DynamicBatcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kidney_edge.errors import ImageReadError
from kidney_edge.imaging import ViewGeometry, load_image, to_view
from kidney_edge.io_utils import atomic_write_bytes
from kidney_edge.runtime.cam import heatmap, overlay, overlay_on_slice, png_data_url
from kidney_edge.runtime.classifier import PARITY_FILE, OnnxClassifier
from kidney_edge.runtime.driver import default_batch_size
from kidney_edge.runtime.precision import PrecisionChoice, file_sha256, resolve_precision
from kidney_edge.runtime.predict import classify
from kidney_edge.runtime.rows import PROBABILITY_PREFIX, probability_column
from kidney_edge.runtime.serve.batcher import Batched, DynamicBatcher
from kidney_edge.runtime.serve.config import ServeConfig
from kidney_edge.runtime.serve.limits import ServerBusy, Upload
from kidney_edge.runtime.serve.metrics import ServeMetrics
from kidney_edge.spec import RegionRule

log = logging.getLogger(__name__)

INTENDED_USE = (
    "Research and edge-deployment engineering. Not a medical device: not for diagnosis or any "
    "clinical decision."
)
# Columns of a prediction row that the answer reshapes; any other column (ood_score, ...) is
# passed through under its own name.
_RESHAPED = ("path", "error", "label", "argmax_label", "confidence")
# What a saved upload's first bytes say it is -> the suffix of its server-chosen name.
_MAGIC_SUFFIXES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"BM", ".bmp"),
                   (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))  # fmt: skip


@dataclass(frozen=True)
class _Job:
    image: Image.Image  # decoded, 8-bit, in the spec's colour mode, resized to the input size
    cam: bool  # the caller wants the activation map


@dataclass(frozen=True)
class _Decoded:
    """An upload brought to the model's view, and the slice it came from (for the activation map)."""

    slice: Image.Image  # decoded, 8-bit, in the spec's colour mode
    view: Image.Image  # after the spec's region and resize rules
    geometry: ViewGeometry  # where the view lies on the slice
    saved: str | None  # server-chosen file name under --save-dir


@dataclass(frozen=True)
class _Scored:
    row: dict[str, Any]  # one row of predict's schema
    heat: np.ndarray | None  # (S, S) in [0, 1] for the row's class; None when not asked or absent


def saved_name(data: bytes) -> str:
    """A server-chosen file name for an upload: time, a random id, a suffix from its content."""
    suffix = ".dcm" if data[128:132] == b"DICM" else ".bin"
    for magic, known in _MAGIC_SUFFIXES:
        if data.startswith(magic):
            suffix = known
            break
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex}{suffix}"


def recorded_figures(model_path: Path, precision: str) -> dict[str, Any] | None:
    """The export's held-out figures of this model under its decision rule, from the gate record
    beside it (``parity.json``); None when there is none."""
    try:
        record = json.loads((model_path.parent / PARITY_FILE).read_text(encoding="utf-8"))
        gate = record["int8"]
        figures = gate[precision]["rule"]
        return {
            "source": f"{PARITY_FILE} beside the model (measured at export)",
            "images": record.get("images"),
            "n_images": gate.get("n_images"),
            "accuracy": figures.get("accuracy"),
            "macro_f1": figures.get("macro_f1"),
            "positive_recall": figures.get("positive_recall"),
            "positive_class": gate.get("positive_class"),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class InferenceService:
    """One loaded model behind a dynamic batcher, with admission control and metrics.

    ``classifier`` (with its ``choice``) may be given ready-made; otherwise the model is
    resolved from ``config`` exactly as ``predict`` resolves it.
    """

    def __init__(
        self,
        config: ServeConfig,
        classifier: OnnxClassifier | None = None,
        choice: PrecisionChoice | None = None,
    ) -> None:
        self.config = config
        layout = config.layout
        if classifier is None:
            choice, classifier = resolve_precision(
                config.model, config.precision, batch_size=config.max_batch, threads=layout.threads,
                load=partial(OnnxClassifier, threads=layout.threads),
            )  # fmt: skip
        self.classifier = classifier
        self.choice = choice
        spec = classifier.spec
        self.identity = {
            "file": classifier.path.name,
            "sha256": file_sha256(classifier.path),
            "spec_schema_version": spec.schema_version,
            "toolkit_version": spec.toolkit_version,
            "precision": "int8" if classifier.is_int8 else "fp32",
        }
        self.metrics = ServeMetrics({key: str(value) for key, value in self.identity.items()})
        self.batcher: DynamicBatcher[_Job, _Scored] = DynamicBatcher(
            self._run_batch,
            max_batch=config.max_batch or default_batch_size(spec.input_size),
            max_wait_s=config.max_wait_ms / 1000,
            workers=layout.workers,
            arriving=lambda: self.in_flight - self.batcher.outstanding,  # admitted, still decoding
        )
        self.decoder = ThreadPoolExecutor(layout.workers, thread_name_prefix="kidney-edge-decode")
        self.in_flight = 0  # images admitted and not yet answered (changed on the event loop only)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start batching (in the event loop that serves the requests)."""
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.decoder.shutdown(wait=True)

    @property
    def ready(self) -> bool:
        return self.batcher.running

    @contextlib.contextmanager
    def admit(self, images: int = 1) -> Iterator[None]:
        """Hold ``images`` places in the queue for a block; ServerBusy (503) when it is full."""
        if self.in_flight + images > self.config.max_queue:
            raise ServerBusy(
                f"server busy: {self.in_flight} images in flight, the limit is {self.config.max_queue} "
                "(--max-queue); retry after the Retry-After seconds"
            )
        self.in_flight += images
        try:
            yield
        finally:
            self.in_flight -= images

    # ------------------------------------------------------------------ one request

    async def classify(self, upload: Upload, *, cam: bool = False) -> dict[str, Any]:
        """The answer for one upload (see :meth:`answer`). Raises ImageReadError (422)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        decoded = await loop.run_in_executor(self.decoder, self._decode, upload)
        decode_s = time.perf_counter() - started
        batched = await self.batcher.submit(_Job(decoded.view, cam))
        row = batched.result.row
        if row["error"] is not None:
            raise ImageReadError(upload.filename or "<upload>", row["error"])
        activation = None
        if cam:
            activation = await loop.run_in_executor(self.decoder, self._activation, decoded, batched.result)
        total_s = time.perf_counter() - started
        stages = {"decode": decode_s, "queue": batched.queue_s, "inference": batched.run_s}
        self.metrics.observe_image(row["label"], stages)
        return self.answer(upload, row, batched, {**stages, "total": total_s}, decoded.saved, activation)

    def _decode(self, upload: Upload) -> _Decoded:
        saved = None
        if self.config.save_dir is not None:
            saved = saved_name(upload.data)
            atomic_write_bytes(self.config.save_dir / saved, upload.data)
        stream = io.BytesIO(upload.data)
        stream.name = upload.filename or "<upload>"  # what errors call the file
        spec = self.classifier.spec
        # The region and the resize here keep them off the serial batch thread (classify(views=True)).
        image = load_image(stream, spec)
        return _Decoded(image, *to_view(image, spec), saved)

    def _run_batch(self, jobs: list[_Job]) -> list[_Scored]:
        """Runs in a batcher worker thread: one :func:`classify` call (one ONNX run) per batch."""
        self.metrics.observe_batch(len(jobs))
        classified = classify(
            [job.image for job in jobs], self.classifier, cam=any(job.cam for job in jobs), views=True
        )
        spec = self.classifier.spec
        scored = []
        for index, (job, row) in enumerate(zip(jobs, classified.rows, strict=True)):
            maps = classified.cams.get(index) if job.cam else None  # (C, h, w)
            heat = None
            if maps is not None:
                label = row["label"]
                shown = label if label in spec.class_names else row["argmax_label"]  # unknown: its argmax
                heat = heatmap(maps[spec.class_names.index(shown)], spec.input_size)
            scored.append(_Scored(row, heat))
        return scored

    def _activation(self, decoded: _Decoded, scored: _Scored) -> dict[str, Any]:
        """The model's view (the decoded upload after the spec's region and resize rules) and the
        CAM overlay over it, as PNG data URLs; where the view is a region of the slice, the CAM
        drawn back onto the whole slice with the region outlined as well."""
        view = decoded.view
        shown = {"view_png": png_data_url(view.convert("RGB")), "slice_overlay_png": None}
        if scored.heat is None:
            return {**shown, "overlay_png": None, "note": "no activation map in this model"}
        if self.classifier.spec.region is not RegionRule.WHOLE:
            drawn = overlay_on_slice(decoded.slice, scored.heat, decoded.geometry)
            shown["slice_overlay_png"] = png_data_url(drawn)
        return {**shown, "overlay_png": png_data_url(overlay(view, scored.heat)), "note": None}

    def answer(
        self,
        upload: Upload,
        row: dict[str, Any],
        batched: Batched[_Scored],
        seconds: dict[str, float],
        saved: str | None,
        activation: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The JSON answer: label, argmax label, probabilities, the rule and whether it fired,
        the model's identity, the latency split, and extra row columns (``ood_score``)."""
        spec = self.classifier.spec
        rule = spec.decision_rule
        probabilities = {name: row[probability_column(name)] for name in spec.class_names}
        fired = None
        if rule.threshold is not None and rule.positive_class is not None:  # a threshold rule
            fired = probabilities[rule.positive_class] >= rule.threshold
        extra = {k: v for k, v in row.items() if k not in _RESHAPED and not k.startswith(PROBABILITY_PREFIX)}
        return {
            "filename": upload.filename,
            "label": row["label"],
            "argmax_label": row["argmax_label"],
            "confidence": row["confidence"],
            "probabilities": probabilities,
            **extra,
            "rule": {
                "kind": rule.kind,
                "positive_class": rule.positive_class or spec.positive_class,
                "threshold": rule.threshold,
                "fired": fired,
                "description": rule.describe(),
            },
            "model": self.identity,
            "latency_ms": {stage: round(s * 1000, 3) for stage, s in seconds.items()},
            "batch_size": batched.batch_size,
            "saved_as": saved,
            "activation": activation,
        }

    # ------------------------------------------------------------------ the model card

    def model_card(self) -> dict[str, Any]:
        """What the page's model card shows: classes, input, rule, OOD detector, recorded figures."""
        classifier, spec = self.classifier, self.classifier.spec
        ood = getattr(classifier, "ood", None)
        return {
            "arch": spec.arch,
            "classes": list(spec.class_names),
            "positive_class": spec.positive_class,
            "input_size": spec.input_size,
            "region": spec.region.value,
            "region_description": spec.region.description,
            "resize": spec.resize.value,
            "color_mode": spec.color_mode.value,
            "ct_window": {"level": spec.ct_window.level, "width": spec.ct_window.width},
            "temperature": spec.temperature,
            "decision_rule": spec.decision_rule.describe(),
            "ood_detector": None if ood is None else ood.describe(),
            "has_cam": classifier.has_cam,
            "precision_reason": None if self.choice is None else self.choice.reason,
            "figures": recorded_figures(classifier.path, self.identity["precision"]),
            "data_fingerprint": spec.data_fingerprint,
            "model": self.identity,
            "intended_use": INTENDED_USE,
            "limits": {
                "max_bytes": self.config.max_bytes,
                "max_files": self.config.max_files,
                "max_queue": self.config.max_queue,
            },
        }
