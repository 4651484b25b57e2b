"""``predict dicomweb+http://…``: classify CT studies on a DICOMweb server and store the results back.

:func:`predict_dicomweb` is a folder run whose files live on a server: the studies picked by a
:class:`~kidney_edge.runtime.dicomweb.Selection` are listed with QIDO-RS (their headers with
WADO-RS metadata), each instance is retrieved into memory as it is classified (nothing is
written to disk but the rows), and the same driver (:func:`~kidney_edge.runtime.driver.run_predict`),
local engine and series rules as a folder of DICOM files give the slice rows and series rows;
the row key of an instance is its WADO-RS URL. With ``report`` the run's triage page
(:mod:`~kidney_edge.runtime.report_page`) is a folder run's, its series read from the same
metadata as the series rows.

With ``store``, each classified series gets one DICOM SR (:mod:`~kidney_edge.runtime.dicom_sr`)
sent into its study with STOW-RS. The SR's UIDs come from the source series and the model file,
so a series that already carries this model's SR is skipped: a rerun stores nothing new, and a
run killed mid-way and run again stores only what is missing. ``force`` stores fresh SRs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from kidney_edge.errors import InputError, KidneyEdgeError
from kidney_edge.runtime.dicom_sr import (
    SR_MODALITY,
    ModelIdentity,
    key_slices,
    report_uids,
    series_report,
)
from kidney_edge.runtime.dicomweb import DicomwebSource, Listing, Selection, SeriesReader, ServerError
from kidney_edge.runtime.driver import RowSink, run_predict
from kidney_edge.runtime.precision import file_sha256
from kidney_edge.runtime.predict import ExecutionLayout, LocalEngine, PredictOptions
from kidney_edge.runtime.rows import EXIT_SERVER, PredictSummary
from kidney_edge.runtime.series import (
    DicomHeader,
    SeriesAssessment,
    SeriesMode,
    SeriesOptions,
    SeriesRule,
    header_of,
)

log = logging.getLogger(__name__)


@dataclass
class StoreSummary:
    """What ``--store`` did: SRs stored, series skipped as already carrying one, failures."""

    stored: int = 0
    skipped: int = 0  # the series already carries this model's SR
    failures: list[tuple[str, str]] = field(default_factory=list)  # (series UID, why)
    stored_uids: list[str] = field(default_factory=list)  # SOPInstanceUIDs of the SRs stored


@dataclass
class PacsPredictSummary(PredictSummary):
    """A predict run against a DICOMweb server: the rows' summary, then series and stored SRs."""

    server: str = ""
    studies: int = 0  # studies found (missing ones are error rows)
    store: StoreSummary | None = None

    @property
    def exit_code(self) -> int:
        code = super().exit_code
        return EXIT_SERVER if code == 0 and self.store is not None and self.store.failures else code


@dataclass(frozen=True)
class DicomwebEngine:
    """The local engine reading instances from a DICOMweb server: it tells the reader which
    instances this run will ask for, then classifies them as a folder run does."""

    engine: LocalEngine
    reader: SeriesReader

    def classify(self, paths: list[str], write: RowSink) -> None:
        self.reader.expect(paths)
        self.engine.classify(paths, write)


def predict_dicomweb(
    source: str,
    selection: Selection,
    options: PredictOptions | None = None,
    *,
    store: bool = False,
    force: bool = False,
    token: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PacsPredictSummary:
    """Classify every instance of the selected studies, write slice and series rows, and with
    ``store`` send one SR per classified series into its study (``force``: even where this
    model's SR is already there). ``token``: a bearer token, or ``user:password`` for HTTP Basic.
    ``options.series``: the series rule (None: the default; mode off is refused: series rows are
    what a DICOMweb run gives). ``options.report``: also the triage page of every row, with the
    pictures of the same ONNX calls."""
    if force and not store:
        raise InputError("--force redoes stored results: it needs --store")
    options = options or PredictOptions()
    series = options.series or SeriesOptions()
    if series.mode is SeriesMode.OFF:
        raise InputError("a DICOMweb source always writes series rows: drop --no-series")
    options = replace(options, series=series)
    layout = options.local_layout()
    pacs = DicomwebSource(source, token)
    try:
        summary, listing = _classify_studies(pacs, selection, options, layout, progress)
        if store and not summary.interrupted:  # results need every slice row: a --resume run stores them
            rule = series.rule
            identity = ModelIdentity(
                Path(summary.model).name, file_sha256(Path(summary.model)), summary.spec_schema_version, summary.toolkit_version,
                summary.decision_rule, rule.describe(),
            )  # fmt: skip
            assessments = [] if summary.series is None else summary.series.assessments
            summary.store = store_reports(
                pacs, listing, assessments, summary.class_names, rule, identity, force=force
            )
        return summary
    finally:
        pacs.close()


def _classify_studies(
    pacs: DicomwebSource,
    selection: Selection,
    options: PredictOptions,
    layout: ExecutionLayout,
    progress: Callable[[int, int], None] | None,
) -> tuple[PacsPredictSummary, Listing]:
    """The driver's run over the selected studies' instances: slice rows, series rows, page."""
    found: dict[str, Listing] = {}
    # instance URL -> header, from the listing's metadata: there before the first row, so the
    # report's strips and the series rows read it instead of files
    headers: dict[str, DicomHeader] = {}

    def list_instances() -> list[str]:
        found["listing"] = listing = pacs.list(selection)
        if not listing.keys:
            raise InputError(f"no study on {pacs.url} matches the selection (--study/--since/--modality)")
        headers.update((key, header_of(key, instance.header)) for key, instance in listing.instances.items())
        return listing.keys

    def start(classifier: Any, summary: PacsPredictSummary) -> DicomwebEngine:
        reader = SeriesReader(pacs, found["listing"])
        evidence = options.report is not None
        return DicomwebEngine(
            LocalEngine(classifier, summary.batch_size, layout.workers, evidence, reader), reader
        )

    summary = run_predict(options.job(layout.threads, headers.get), list_files=list_instances, start=start,
                          progress=progress,
                          new_summary=partial(PacsPredictSummary, workers=layout.workers, server=pacs.url))  # fmt: skip
    listing = found["listing"]
    summary.studies = len({instance.study_uid for instance in listing.instances.values()})
    return summary, listing


def store_reports(
    pacs: DicomwebSource,
    listing: Listing,
    assessments: list[SeriesAssessment],
    class_names: tuple[str, ...],
    rule: SeriesRule,
    identity: ModelIdentity,
    *,
    force: bool = False,
) -> StoreSummary:
    """One SR per labelled series, STOW-RS into its study; a series whose SR (same UID) is already
    there is skipped unless ``force``. A failure is recorded per series; each SR is one whole
    instance in one request, so a failed store leaves nothing behind."""
    result = StoreSummary()
    by_study: dict[str, list[SeriesAssessment]] = {}
    for assessment in assessments:
        if assessment.row["label"] is not None:
            by_study.setdefault(assessment.row["study_uid"], []).append(assessment)
    for study_uid, items in by_study.items():
        try:
            present = set() if force else pacs.instance_uids(study_uid, SR_MODALITY)
        except ServerError as exc:
            result.failures.extend((item.row["series_uid"], str(exc)) for item in items)
            continue
        for assessment in items:
            _store_one(pacs, listing, assessment, class_names, rule, identity, force, present, result)
    log.info(
        "SRs: %d stored, %d already there, %d failed", result.stored, result.skipped, len(result.failures)
    )
    return result


def _store_one(
    pacs: DicomwebSource,
    listing: Listing,
    assessment: SeriesAssessment,
    class_names: tuple[str, ...],
    rule: SeriesRule,
    identity: ModelIdentity,
    force: bool,
    present: set[str],
    result: StoreSummary,
) -> None:
    row = assessment.row
    uids = report_uids(row["study_uid"], row["series_uid"], identity, fresh=force)
    if uids.sop_uid in present:
        result.skipped += 1
        return
    evidence = [listing.instances[header.path].header for header, _ in assessment.ordered]
    key = [listing.instances[header.path].header for header in key_slices(assessment, class_names, rule)]
    try:
        report = series_report(assessment, evidence, key, class_names, identity, uids)
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom refuses what breaks the standard
        result.failures.append((row["series_uid"], f"the SR could not be built: {exc}"))
        return
    try:
        pacs.store(row["study_uid"], [report])
    except KidneyEdgeError as exc:
        result.failures.append((row["series_uid"], str(exc)))
        return
    result.stored += 1
    result.stored_uids.append(uids.sop_uid)
