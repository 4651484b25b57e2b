"""The predictions schema, once: columns, how rows are filled and written, and how a run counts them.

:func:`output_columns` names the columns of predict's CSV/JSONL/Parquet rows (and, ``labelled``,
of evaluate's predictions.csv), :func:`prediction_rows` fills them from probabilities under the
spec's decision rule, :func:`format_predictions` writes them with :data:`FLOAT_DIGITS`
decimals, and :class:`PredictSummary` counts them under one rule (:func:`label_counts`). Every
engine (local threads, Ray actors), serve, series rows and evaluation take these names from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kidney_edge.io_utils import csv_text
from kidney_edge.spec import UNKNOWN_LABEL, ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    from kidney_edge.runtime.series import SeriesSummary

FLOAT_DIGITS = 6  # decimals of every float in a predictions or series CSV
PROBABILITY_PREFIX = "p_"  # p_<Class>: one probability (or series score) column per class
# Number columns besides the p_<Class> ones; every other predictions column holds text.
_NUMBER_COLUMNS = ("confidence", "ood_score")

EXIT_OK = 0
EXIT_NOTHING_READ = 2  # same code as bad arguments: nothing useful came out of the run
EXIT_SOME_FAILED = 3  # predictions were written, but some files have an `error` row instead
# A DICOMweb server could not be reached, refused the credentials, or rejected a stored result:
# unlike 2 the arguments may be right (retry when the server is back, or fix the token).
EXIT_SERVER = 4
_MAX_LISTED_FAILURES = 20


# predict's --out when none is given; the series rows (series.series_path) and the triage page
# (report_path) are named from it.
DEFAULT_PREDICTIONS_FILE = "predictions.csv"


class OutputFormat(str, Enum):
    """Format of a predictions file (``--format``)."""

    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"  # a folder of Parquet parts: written by `--engine ray` only


REPORT_SUFFIX = ".report.html"  # predict --report's page: <predictions stem>.report.html beside the rows


def report_path(predictions: str | os.PathLike[str]) -> Path:
    """Where ``predict --report`` writes its page without a PATH: beside the predictions file,
    ``predictions.csv`` -> ``predictions.report.html``."""
    predictions = Path(predictions)
    return predictions.with_name(predictions.stem + REPORT_SUFFIX)


def probability_column(class_name: str) -> str:
    """The column of one class's probability: ``p_<Class>``."""
    return f"{PROBABILITY_PREFIX}{class_name}"


def is_number_column(column: str) -> bool:
    """Whether a predictions column holds a number (probability, confidence, OOD score) rather than text."""
    return column.startswith(PROBABILITY_PREFIX) or column in _NUMBER_COLUMNS


def output_columns(class_names: Sequence[str], *, labelled: bool = False) -> list[str]:
    """The predictions schema: ``path``, ``label``, ``argmax_label``, ``confidence``,
    ``p_<Class>`` per class, ``ood_score``, ``error``.

    ``labelled`` (evaluate's predictions.csv): ``true_label`` after ``path`` and no ``error``,
    since every evaluated file was read or the evaluation stopped naming it.
    """
    probabilities = [probability_column(name) for name in class_names]
    scores = ["label", "argmax_label", "confidence", *probabilities, "ood_score"]
    return ["path", "true_label", *scores] if labelled else ["path", *scores, "error"]


def prediction_rows(
    paths: Sequence[Any],
    probabilities: np.ndarray,
    spec: ModelSpec,
    *,
    true_labels: Sequence[str] | None = None,
    ood_scores: np.ndarray | None = None,
    unknown: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One row per file of :func:`output_columns`: ``label`` under the spec's decision rule, or
    :data:`~kidney_edge.spec.UNKNOWN_LABEL` where ``unknown`` (the OOD detector rejected it);
    ``argmax_label`` the most probable class; ``confidence`` the label's probability (empty for
    unknown); ``ood_score`` the detector's score (empty without a detector).

    With ``true_labels`` the rows are ``labelled``: they carry ``true_label`` and no ``error``.
    """
    n = len(paths)
    labels, argmax = spec.decide(probabilities), probabilities.argmax(axis=1)
    truths = [None] * n if true_labels is None else true_labels
    scores = [None] * n if ood_scores is None else [float(score) for score in ood_scores]
    rejected = np.zeros(n, dtype=bool) if unknown is None else np.asarray(unknown, dtype=bool)
    rows = []
    for i, (path, truth, label, top, probs) in enumerate(
        zip(paths, truths, labels, argmax, probabilities, strict=True)
    ):
        row: dict[str, Any] = {"path": path}
        if true_labels is not None:
            row["true_label"] = truth
        row.update(
            label=UNKNOWN_LABEL if rejected[i] else spec.class_names[label],
            argmax_label=spec.class_names[top],
            confidence=None if rejected[i] else float(probs[label]),
        )
        row.update(
            {probability_column(name): float(p) for name, p in zip(spec.class_names, probs, strict=True)}
        )
        row["ood_score"] = scores[i]
        if true_labels is None:
            row["error"] = None
        rows.append(row)
    return rows


def error_row(path: Any, error: str, class_names: Sequence[str]) -> dict[str, Any]:
    """The row of a file that got no prediction: its ``path`` and ``error``, every score empty."""
    return {**dict.fromkeys(output_columns(class_names)), "path": path, "error": error}


def is_failed(row: Mapping[str, Any]) -> bool:
    """Whether a row is a file that could not be classified (labelled rows have no ``error``)."""
    return bool(row.get("error"))


def is_unknown(row: Mapping[str, Any]) -> bool:
    """Whether a classified row was rejected by the OOD detector (label ``unknown``)."""
    return not is_failed(row) and row.get("label") == UNKNOWN_LABEL


def row_probabilities(rows: Iterable[Mapping[str, Any]], class_names: Sequence[str]) -> np.ndarray:
    """(N, C) float64 probabilities of prediction rows, numbers or CSV text alike."""
    columns = [probability_column(name) for name in class_names]
    return np.array([[float(row[column]) for column in columns] for row in rows], dtype=np.float64)


def format_predictions(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    fmt: OutputFormat = OutputFormat.CSV,
    *,
    header: bool = False,
) -> str:
    """Rows as CSV lines (``header`` first when asked; floats with :data:`FLOAT_DIGITS` decimals,
    None as an empty cell) or as JSON lines."""
    if fmt is OutputFormat.JSONL:
        return "".join(json.dumps(row) + "\n" for row in rows)
    return csv_text(rows, columns, header=header, float_digits=FLOAT_DIGITS)


def label_counts(class_names: Sequence[str], *, ood: bool) -> dict[str, int]:
    """Zero counts of every label a run can give: each class, then ``unknown`` when an OOD
    detector is on (``ood``).

    The labels are known before the first row, so a summary lists them all, zeros included: a
    run whose detector rejected nothing says ``unknown 0``, which a run without one never does.
    A label outside them is a bug and raises KeyError when counted, instead of a new row.
    """
    return dict.fromkeys((*class_names, *([UNKNOWN_LABEL] if ood else [])), 0)


@dataclass
class PredictSummary:
    """What a predict run did, whatever engine ran it. ``exit_code`` is what the CLI exits with."""

    out: Path
    model: Path
    fmt: str
    decision_rule: str
    class_names: tuple[str, ...]
    is_int8: bool
    ood_detector: str | None  # the detector in words; None without one (or with --no-ood)
    threads: int
    workers: int
    batch_size: int
    total_files: int = 0  # images found in the folder
    skipped: int = 0  # already in the output (--resume)
    predicted: int = 0
    failed: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)  # label_counts(), then counted
    failures: list[tuple[str, str]] = field(default_factory=list)  # the first few (path, error)
    wall_s: float = 0.0
    first_batch_s: float | None = None  # from the call to the first batch on disk
    interrupted: bool = False
    precision: str = ""  # fp32 or int8: the model that ran (runtime.precision)
    precision_reason: str = ""  # why that one: forced, gate record, measured speed on this CPU
    precision_warning: str | None = None  # a forced INT8 without a passed accuracy gate
    positive_class: str | None = None  # the spec's positive class (series rows name its peak slice)
    spec_schema_version: int = 0  # the model's identity beside its file (DICOM SR results name it)
    toolkit_version: str = ""  # the kidney-edge version that exported the model
    report: Path | None = None  # the triage page written at the end (--report)
    series: SeriesSummary | None = None  # the series rows written at the end (--series)

    @property
    def processed(self) -> int:
        return self.predicted + self.failed

    @property
    def images_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.failed == 0:
            return EXIT_OK
        return EXIT_NOTHING_READ if self.predicted == 0 else EXIT_SOME_FAILED

    def record(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Count written rows: predicted per label (``class_counts``), failed, the first failures."""
        for row in rows:
            if is_failed(row):
                self.failed += 1
                if len(self.failures) < _MAX_LISTED_FAILURES:
                    self.failures.append((row["path"], row["error"]))
            else:
                self.predicted += 1
                self.class_counts[row["label"]] += 1
