"""One series' result as a DICOM Structured Report: highdicom's TID 1500 measurement report.

:func:`series_report` builds a Comprehensive 3D SR whose one measurement group (TID 1501) holds
the series label (a qualitative evaluation), one probability per class (measurements, UCUM
``1``), the slices that drove the label (source images), and the model's identity in the
algorithm identification: the model file's sha256, the spec schema version, the toolkit
version, the series rule and slice decision rule in words, and "research use, not for
diagnosis", which the series description repeats. Patient and study attributes are copied by
highdicom from the evidence (the series' own instances), never made up; every instance of the
series that was aggregated is referenced as evidence.

UIDs are derived from the source series, the model file and the series and slice decision rules
(:func:`report_uids`): storing the same result twice gives the same SOPInstanceUID, which is how
a rerun or a resumed run sees that a series already carries this model's report under these
rules, while a run under another rule (``--aggregate``, ``--top-k``, ...) stores its own
(``--force`` asks for fresh UIDs instead).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kidney_edge.runtime.rows import probability_column
from kidney_edge.runtime.series import DEFAULT_TOP_K, Aggregation, SeriesAssessment, SeriesRule

CODING_SCHEME = "99KIDNEYEDGE"  # private coding scheme (PS3.16 8.2: designators starting "99")
SR_MODALITY = "SR"
RESEARCH_USE = "research use, not for diagnosis"
SERIES_DESCRIPTION = f"kidney-edge AI result ({RESEARCH_USE})"
SR_SERIES_NUMBER = 9901  # far above a scanner's series numbers, so a viewer lists it last


@dataclass(frozen=True)
class ModelIdentity:
    """What an SR says about the model that made it, and what makes its UIDs its own."""

    file_name: str
    sha256: str
    spec_schema_version: int
    toolkit_version: str
    decision_rule: str  # the slice rule in words
    series_rule: str  # aggregation and series rule in words

    def parameters(self) -> list[str]:
        return [
            f"model file {self.file_name} sha256 {self.sha256}",
            f"spec schema version {self.spec_schema_version}",
            f"series rule: {self.series_rule}",
            f"slice decision rule: {self.decision_rule}",
            RESEARCH_USE,
        ]


@dataclass(frozen=True)
class ReportUids:
    series_uid: str  # the SR series of this model in the study
    sop_uid: str  # the SR of one source series


def derived_uid(*parts: str) -> str:
    """A UID under 2.25 (PS3.5 B.2) from a name-based UUID of ``parts``: the same parts, the same UID."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=5).int}"


def report_uids(
    study_uid: str, series_uid: str, identity: ModelIdentity, *, fresh: bool = False
) -> ReportUids:
    """UIDs of the SR of (source series, model, rules): the same on every run, or new ones when
    ``fresh``. The rules are part of them because they decide the label the SR states."""
    rules = [identity.series_rule, identity.decision_rule]
    salt = [str(uuid.uuid4())] if fresh else []
    return ReportUids(
        series_uid=derived_uid(study_uid, identity.sha256, *rules, "sr-series", *salt),
        sop_uid=derived_uid(study_uid, series_uid, identity.sha256, *rules, "sr", *salt),
    )


# Type 2 attributes of the Patient and General Study modules that an SR must carry, present but
# possibly empty (PS3.3 C.7.1.1, C.7.2.1). A source without them gives the SR an empty value:
# copied as it is, never made up.
_PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


def _with_empty_type2(header: Any) -> Any:
    """A copy of ``header`` in which each of :data:`_PATIENT_STUDY_TYPE2` it lacks is present and empty."""
    import copy

    filled = copy.copy(header)
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in filled:
            setattr(filled, keyword, "")
    return filled


def _code(value: str, meaning: str) -> Any:
    from pydicom.sr.coding import Code

    return Code(value, CODING_SCHEME, meaning)


def key_slices(assessment: SeriesAssessment, class_names: Sequence[str], rule: SeriesRule) -> list[Any]:
    """Headers of the slices that drove the label: the top-k (``max``: the top one; other
    aggregations: the top :data:`~kidney_edge.runtime.series.DEFAULT_TOP_K`) by the probability of
    the label's class, or, for a normal label, of the strongest finding's class."""
    label, row = assessment.row["label"], assessment.row
    driver = label
    if label == rule.normal_class:
        findings = [name for name in class_names if name != rule.normal_class]
        driver = max(findings, key=lambda name: float(row[probability_column(name)]), default=label)
    k = (
        1
        if rule.aggregate is Aggregation.MAX
        else rule.top_k
        if rule.aggregate is Aggregation.TOPK
        else DEFAULT_TOP_K
    )
    ranked = sorted(assessment.ordered, key=lambda item: -float(item[1][probability_column(driver)]))
    return [header for header, _ in ranked[:k]]


def series_report(
    assessment: SeriesAssessment,
    evidence: Sequence[Any],
    key: Sequence[Any],
    class_names: Sequence[str],
    identity: ModelIdentity,
    uids: ReportUids,
) -> Any:  # -> highdicom.sr.Comprehensive3DSR
    """The SR of one classified series: ``evidence`` the series' aggregated instances (pydicom
    headers), ``key`` those among them that drove the label."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    row = assessment.row
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(identity.sha256, "device"), name="kidney-edge",
        manufacturer_name="kidney-edge", model_name=identity.file_name,
    )  # fmt: skip
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.sop_uid, identifier=f"series {row['series_uid']}"
        ),
        finding_type=codes.SCT.Kidney,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name="kidney-edge", version=identity.toolkit_version, parameters=identity.parameters()
        ),
        finding_sites=[hd.sr.FindingSite(codes.SCT.Kidney)],
        measurements=[
            hd.sr.Measurement(
                name=_code(f"p-{name}", f"Probability of {name}"),
                value=float(row[probability_column(name)]),
                unit=codes.UCUM.NoUnits,
            )  # fmt: skip
            for name in class_names
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                _code("series-label", "Series label"), _code(row["label"], row["label"])
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID) for ds in key],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device)
        ),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[_with_empty_type2(evidence[0]), *evidence[1:]], content=report, series_instance_uid=uids.series_uid,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=uids.sop_uid,
        instance_number=int(evidence[0].get("SeriesNumber") or 1),  # one SR per source series, numbered alike
        manufacturer="kidney-edge", is_complete=True, series_description=SERIES_DESCRIPTION,
    )  # fmt: skip
