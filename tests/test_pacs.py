"""``predict dicomweb+http://…`` against a real Orthanc with its DICOMweb plugin (tests/_orthanc.py).

The session's Orthanc holds small phantom studies (4 CT series at 64 px, one MR series, one
localizer inside a CT series); the same files sit in a folder, so every dicomweb row can be held
against the folder run's row of the same SOPInstanceUID. Faults come from the server itself
(a stopped server, a wrong password on an Orthanc with authentication on, a study it does not
hold) or from tests/_orthanc.py's FaultProxy (a retrieve cut mid-stream, a rejected store).
"""

from __future__ import annotations

import contextlib
import csv
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("dicomweb_client")
pytest.importorskip("highdicom")

import _orthanc  # noqa: E402
from _factories import make_cam_onnx, make_tiny_onnx  # noqa: E402
from conftest import CI_VARIABLE  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from kidney_edge.cli import app  # noqa: E402
from kidney_edge.phantoms.dicom_series import SeriesPhantomConfig, SliceHeader, synthesize_series, write_slice  # noqa: E402
from kidney_edge.runtime.dicom_sr import RESEARCH_USE, SR_MODALITY  # noqa: E402
from kidney_edge.runtime.dicomweb import TOKEN_ENV  # noqa: E402
from kidney_edge.runtime.predict import scan_image_paths  # noqa: E402
from kidney_edge.runtime.rows import EXIT_NOTHING_READ, EXIT_OK, EXIT_SERVER, EXIT_SOME_FAILED  # noqa: E402
from kidney_edge.spec import DEFAULT_CLASS_NAMES, ModelSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = DEFAULT_CLASS_NAMES
PROBABILITIES = [f"p_{name}" for name in CLASSES]
runner = CliRunner()
_REAL_CONNECT = socket.socket.connect
_REAL_CREATE_CONNECTION = socket.create_connection


def _require_orthanc() -> None:
    why = _orthanc.missing()
    if why is None:
        return
    if os.environ.get(CI_VARIABLE, "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{CI_VARIABLE} is set, so a missing Orthanc fails: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(autouse=True)
def loopback_only(no_network: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite refuses the network; these tests may reach servers on 127.0.0.1 only."""

    def loopback(address: object) -> bool:
        return isinstance(address, tuple) and address[0] in ("127.0.0.1", "localhost", "::1")

    def connect(sock: socket.socket, address: object) -> None:
        if not loopback(address):
            raise RuntimeError(f"network access attempted in a test: {address!r}")
        return _REAL_CONNECT(sock, address)

    def create_connection(address: object, *args: object, **kwargs: object) -> socket.socket:
        if not loopback(address):
            raise RuntimeError(f"network access attempted in a test: {address!r}")
        return _REAL_CREATE_CONNECTION(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)


def _odd_series(folder: Path) -> None:
    """An MR series (not CT: a row with a reason) and a CT series with a localizer among its slices."""
    hu = np.full((64, 64), 40.0)
    for i in range(3):
        write_slice(folder / "MR1" / f"1.2.826.0.1.3680043.8.498.7001.1.{i + 1}", hu, SliceHeader("MR1", "1.2.826.0.1.3680043.8.498.7001",
                    "1.2.826.0.1.3680043.8.498.7001.1", f"1.2.826.0.1.3680043.8.498.7001.1.{i + 1}", i + 1,
                    (0.0, 0.0, -5.0 * i), modality="MR"))  # fmt: skip
    for i in range(4):
        image_type = ("ORIGINAL", "PRIMARY", "LOCALIZER") if i == 0 else ("ORIGINAL", "PRIMARY", "AXIAL")
        write_slice(folder / "LOC1" / f"1.2.826.0.1.3680043.8.498.7002.1.{i + 1}", hu + 30 * i, SliceHeader("LOC1", "1.2.826.0.1.3680043.8.498.7002",
                    "1.2.826.0.1.3680043.8.498.7002.1", f"1.2.826.0.1.3680043.8.498.7002.1.{i + 1}", i + 1,
                    (0.0, 0.0, -5.0 * i), image_type=image_type))  # fmt: skip


@pytest.fixture(scope="session")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Orthanc holding the phantom studies, the same files in a folder, and a tiny model."""
    _require_orthanc()
    root = tmp_path_factory.mktemp("pacs")
    folder = root / "studies"
    synthesize_series(
        folder, SeriesPhantomConfig(n_series=4, seed=5, size=64, slices_per_series=(5, 7), quirks=False)
    )
    _odd_series(folder)
    model = make_tiny_onnx(root / "model" / "model.onnx", ModelSpec(input_size=32))
    with _orthanc.running_orthanc(root / "orthanc") as server:
        _orthanc.upload(server, scan_image_paths(folder))
        yield {"server": server, "folder": folder, "model": model, "root": root}


def _predict(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, ["predict", *args], env={"COLUMNS": "240", **(env or {})})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _sop(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _since(pacs: dict, out: Path, *extra: str, source: str | None = None) -> tuple[int, str]:
    return _predict(source or pacs["server"].source, "--since", "2000-01-01", "--model", str(pacs["model"]),
                    "--out", str(out), *extra)  # fmt: skip


# --------------------------------------------------------------------------- rows


def test_dicomweb_rows_equal_the_folder_rows_of_the_same_files(pacs: dict, tmp_path: Path) -> None:
    code, output = _predict(
        str(pacs["folder"]), "--model", str(pacs["model"]), "--out", str(tmp_path / "f.csv")
    )
    assert code == EXIT_OK, output
    code, output = _since(pacs, tmp_path / "w.csv")
    assert code == EXIT_OK, output
    assert "6 studies from" in output
    folder = {_sop(row["path"]): row for row in _rows(tmp_path / "f.csv")}
    web = {_sop(row["path"]): row for row in _rows(tmp_path / "w.csv")}
    assert set(web) == set(folder) and len(web) == len(scan_image_paths(pacs["folder"]))
    assert all(row["path"].startswith(pacs["server"].dicomweb + "/studies/") for row in web.values())
    for sop, row in web.items():
        assert row["label"] == folder[sop]["label"]
        np.testing.assert_allclose([float(row[c]) for c in PROBABILITIES],
                                   [float(folder[sop][c]) for c in PROBABILITIES], atol=1e-6)  # fmt: skip
    folder_series = {row["series_uid"]: row for row in _rows(tmp_path / "f.series.csv")}
    web_series = {row["series_uid"]: row for row in _rows(tmp_path / "w.series.csv")}
    assert set(web_series) == set(folder_series) and len(web_series) == 6
    for uid, row in web_series.items():
        same = folder_series[uid]
        for column in ("label", "n_files", "n_slices", "n_left_out", "peak_instance", "warning", "error"):
            assert row[column] == same[column], (uid, column)
        if row["label"]:
            np.testing.assert_allclose([float(row[c]) for c in PROBABILITIES],
                                       [float(same[c]) for c in PROBABILITIES], atol=1e-6)  # fmt: skip
    reasons = {row["modality"]: row for row in web_series.values()}
    assert (
        reasons["MR"]["error"].startswith("modality MR: the model reads CT slices")
        and not reasons["MR"]["label"]
    )
    localizer = web_series["1.2.826.0.1.3680043.8.498.7002.1"]
    assert "1 localizer/scout image(s)" in localizer["warning"] and localizer["n_left_out"] == "1"


def test_selection_by_study_and_modality(pacs: dict, tmp_path: Path) -> None:
    code, output = _predict(pacs["server"].source, "--study", "1.2.826.0.1.3680043.8.498.7002",
                            "--study", "1.2.826.0.1.3680043.8.498.7001", "--modality", "CT",
                            "--model", str(pacs["model"]), "--out", str(tmp_path / "p.csv"))  # fmt: skip
    assert code == EXIT_OK, output
    rows = _rows(tmp_path / "p.csv")
    assert len(rows) == 4 and all("/studies/1.2.826.0.1.3680043.8.498.7002/" in row["path"] for row in rows)


def test_report_of_a_dicomweb_run_has_cards_and_one_strip_per_series(pacs: dict, tmp_path: Path) -> None:
    from collections import Counter

    from test_report_page import page_counts

    from kidney_edge.runtime.rows import report_path

    model = make_cam_onnx(tmp_path / "cam.onnx", ModelSpec(input_size=32))  # has a cam output: maps on cards
    out = tmp_path / "w.csv"
    code, output = _predict(pacs["server"].source, "--since", "2000-01-01", "--model", str(model),
                            "--out", str(out), "--report", "--workers", "1")  # fmt: skip
    assert code == EXIT_OK, output
    page, rows = report_path(out).read_text(encoding="utf-8"), _rows(out)
    assert f"triage page -> {report_path(out)}" in output.replace("\n", "")
    expected = Counter("error" if row["error"] else row["label"] for row in rows)
    assert {k: v for k, v in page_counts(page).items() if v} == dict(expected) and len(rows) == 32
    # One strip per series row, keyed by its UIDs; each labelled one shows key slices with maps.
    strips = dict(re.findall(r'<article class="series"[^>]*><h3>series ([\d.]+):(.*?)</article>', page, re.S))
    series = {row["series_uid"]: row for row in _rows(tmp_path / "w.series.csv")}
    assert set(strips) == set(series) and len(strips) == 6
    for uid, strip in strips.items():
        slices = min(5, int(series[uid]["n_slices"] or 0)) if series[uid]["label"] else 0
        assert strip.count('<img src="data:image/jpeg;base64,') == slices, uid
        assert ('<svg class="zcurve"' in strip) == bool(slices), uid
    mr_series = strips["1.2.826.0.1.3680043.8.498.7001.1"]  # not CT: a strip with its reason, no slices
    assert "modality MR: the model reads CT slices" in mr_series
    cards = re.findall(r'<article class="card"[^>]*data-path="([^"]+)">', page)
    assert cards and all(path.startswith(pacs["server"].dicomweb + "/studies/") for path in cards)
    assert "no activation map in this model" not in page


# --------------------------------------------------------------------------- stored results


def _stored_reports(pacs: dict) -> dict[str, object]:
    """Every SR on the server, read back with pydicom, by the source series its evidence names."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(pacs["server"].dicomweb)
    reports: dict[str, list] = {}
    for found in client.search_for_instances(search_filters={"Modality": SR_MODALITY}):
        study, series, sop = (found[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018"))
        report = client.retrieve_instance(study, series, sop)
        assert isinstance(report, pydicom.Dataset)
        (evidence,) = report.CurrentRequestedProcedureEvidenceSequence
        (source_series,) = evidence.ReferencedSeriesSequence
        reports.setdefault(source_series.SeriesInstanceUID, []).append(report)
    return reports


def _content(report: object) -> dict[str, object]:
    """The label, probabilities, key slices and algorithm parameters of a stored SR."""
    found: dict[str, object] = {"probabilities": {}, "key": [], "parameters": []}

    def walk(items: object) -> None:
        for item in items:
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.ValueType == "NUM" and meaning.startswith("Probability of "):
                found["probabilities"][meaning.removeprefix("Probability of ")] = float(
                    item.MeasuredValueSequence[0].NumericValue)  # fmt: skip
            elif item.ValueType == "CODE" and meaning == "Series label":
                found["label"] = item.ConceptCodeSequence[0].CodeValue
            elif item.ValueType == "IMAGE":
                found["key"].append(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            elif item.ValueType == "TEXT" and meaning == "Algorithm Parameters":
                found["parameters"].append(item.TextValue)
            walk(item.get("ContentSequence", []))

    walk(report.ContentSequence)
    return found


def test_store_writes_one_sr_per_classified_series_and_a_rerun_stores_nothing(
    pacs: dict, tmp_path: Path
) -> None:
    code, output = _since(pacs, tmp_path / "p.csv", "--store")
    assert code == EXIT_OK, output
    assert "SRs stored: 5, already there: 0, failed: 0" in output  # 6 series, the MR one is not classified
    series = {row["series_uid"]: row for row in _rows(tmp_path / "p.series.csv") if row["label"]}
    slices = {_sop(row["path"]): row for row in _rows(tmp_path / "p.csv")}
    reports = _stored_reports(pacs)
    assert set(reports) == set(series) and all(len(found) == 1 for found in reports.values())
    for uid, (report,) in reports.items():
        row, content = series[uid], _content(report)
        assert content["label"] == row["label"]
        assert content["probabilities"] == pytest.approx({c: float(row[f"p_{c}"]) for c in CLASSES}, abs=1e-6)
        assert report.StudyInstanceUID == row["study_uid"] and report.PatientID == row["patient_id"]
        assert report.PatientName == f"Phantom^{row['patient_id']}" and report.Modality == SR_MODALITY
        assert report.SeriesInstanceUID != uid and report.SOPInstanceUID not in slices
        referenced = {item.ReferencedSOPInstanceUID for item in
                      report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence}  # fmt: skip
        assert referenced == {sop for sop, r in slices.items() if f"/series/{uid}/" in r["path"]} - {
            "1.2.826.0.1.3680043.8.498.7002.1.1"
        }  # the localizer was left out of the aggregation
        assert content["key"] and set(content["key"]) <= referenced
        top = max(content["key"], key=lambda sop: float(slices[sop][f"p_{row['label']}"]))
        assert float(slices[top][f"p_{row['label']}"]) == max(
            float(slices[s][f"p_{row['label']}"]) for s in referenced
        )
        text = " ".join(content["parameters"])
        assert RESEARCH_USE in text and "sha256 " in text and "series rule: top-3 mean" in text
        assert RESEARCH_USE in report.SeriesDescription
    code, output = _since(pacs, tmp_path / "again.csv", "--store")
    assert code == EXIT_OK and "SRs stored: 0, already there: 5, failed: 0" in output, output
    assert {uid: len(found) for uid, found in _stored_reports(pacs).items()} == dict.fromkeys(series, 1)
    code, output = _since(pacs, tmp_path / "forced.csv", "--store", "--force")
    assert code == EXIT_OK and "SRs stored: 5, already there: 0" in output, output
    assert {uid: len(found) for uid, found in _stored_reports(pacs).items()} == dict.fromkeys(series, 2)


# Messages dciodvfy may print on our SR, and why each is right:
# - "Unrecognized defined term <99KIDNEYEDGE> ... Coding Scheme Designator": the label and
#   probability codes are in a private coding scheme, which PS3.16 8.2 lets a "99" prefix
#   name; dciodvfy knows only the standard schemes.
# - "Missing attribute or value that would be needed to build DICOMDIR - Study Time": the
#   phantom's studies have no StudyTime; the SR copies the study as it is (empty, type 2)
#   instead of making one up.
TOLERATED = (
    re.compile(
        r"^Warning - Unrecognized defined term <99KIDNEYEDGE> for value 1 of attribute <Coding Scheme Designator>$"
    ),
    re.compile(r"^Warning - Missing attribute or value that would be needed to build DICOMDIR - Study Time$"),
)


def test_a_stored_sr_passes_dciodvfy(pacs: dict, tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        _require_orthanc()  # same rule: under CI the validator must be there (.ci/run installs dicom3tools)
        if os.environ.get(CI_VARIABLE):
            pytest.fail("CI is set and dciodvfy (dicom3tools) is missing", pytrace=False)
        pytest.skip("dciodvfy is not installed: apt-get install dicom3tools")
    code, output = _predict(pacs["server"].source, "--study", "1.2.826.0.1.3680043.8.498.7002", "--model",
                            str(pacs["model"]), "--out", str(tmp_path / "p.csv"), "--store", "--force")  # fmt: skip
    assert code == EXIT_OK, output
    report = _stored_reports(pacs)["1.2.826.0.1.3680043.8.498.7002.1"][-1]
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    checked = subprocess.run(
        ["dciodvfy", str(tmp_path / "sr.dcm")], capture_output=True, text=True, timeout=60
    )
    lines = [line.strip() for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]
    assert "Comprehensive3DSR" in lines, lines  # it recognised the IOD it validated
    messages = [line for line in lines if line.startswith(("Error", "Warning"))]
    assert not [line for line in messages if line.startswith("Error")], messages
    assert [line for line in messages if not any(rule.match(line) for rule in TOLERATED)] == []


# --------------------------------------------------------------------------- resumable


def _series_truth(folder: Path) -> list[dict[str, str]]:
    with open(folder / "series_truth.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_run_killed_mid_way_resumes_without_duplicate_srs(pacs: dict, tmp_path: Path) -> None:
    folder = tmp_path / "studies"
    synthesize_series(
        folder, SeriesPhantomConfig(n_series=3, seed=11, size=64, slices_per_series=(5, 6), quirks=False)
    )
    truth = _series_truth(folder)
    out = tmp_path / "p.csv"
    with _orthanc.running_orthanc(tmp_path / "orthanc") as server:
        _orthanc.upload(server, scan_image_paths(folder))
        own = {**pacs, "server": server}
        with _orthanc.FaultProxy(server.http_url, delay_s=0.03) as slow:
            args = [sys.executable, "-m", "kidney_edge", "predict", slow.source, "--since", "2000-01-01", "--model",
                    str(pacs["model"]), "--out", str(out), "--store", "--batch-size", "1", "--workers", "1"]  # fmt: skip
            run = subprocess.Popen(args, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                not out.is_file() or len(out.read_bytes().splitlines()) < 4
            ):
                time.sleep(0.005)
            run.kill()  # SIGKILL: no handler runs, the last row may be half written
            run.wait()
            assert 3 <= len(_rows(out)) < 16, "the kill came after the run or before its first rows"
            slow.delay_s = 0.0  # rows are keyed by URL: the rerun reads through the same address
            code, output = _since(own, out, "--store", "--resume", source=slow.source)
        assert code == EXIT_OK, output
        rows = _rows(out)
        assert len(rows) == len({row["path"] for row in rows}) == len(scan_image_paths(folder))
        reports = _stored_reports(own)
        assert {uid: len(found) for uid, found in reports.items()} == {row["series_uid"]: 1 for row in truth}
        code, output = _since(own, out, "--store", "--resume")
        assert code == EXIT_OK and "SRs stored: 0, already there: 3, failed: 0" in output, output


# --------------------------------------------------------------------------- faults


def _one_line_error(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def test_a_stopped_server_is_one_line_and_exit_code_4(pacs: dict, tmp_path: Path) -> None:
    source = f"dicomweb+http://127.0.0.1:{_orthanc.free_port()}/dicom-web"
    code, output = _since(pacs, tmp_path / "p.csv", source=source)
    assert code == EXIT_SERVER
    assert "cannot reach the DICOMweb server" in _one_line_error(output)
    assert not (tmp_path / "p.csv").exists() or len(_rows(tmp_path / "p.csv")) == 0


@pytest.fixture(scope="module")
def guarded(pacs: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_orthanc.Orthanc]:
    """A second Orthanc with HTTP Basic authentication on, holding one study."""
    with _orthanc.running_orthanc(tmp_path_factory.mktemp("guarded"), users={"edge": "s3cret-pw"}) as server:
        _orthanc.upload(server, scan_image_paths(pacs["folder"] / "LOC1"))
        yield server


def test_wrong_or_missing_credentials_are_refused_and_never_echoed(guarded: _orthanc.Orthanc, pacs: dict,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    base = [
        guarded.source,
        "--since",
        "2000-01-01",
        "--model",
        str(pacs["model"]),
        "--out",
        str(tmp_path / "p.csv"),
    ]
    code, output = _predict(*base, env={TOKEN_ENV: "edge:not-the-password"})
    assert code == EXIT_SERVER and "not-the-password" not in output
    assert "refused the study search (HTTP 401)" in _one_line_error(output) and TOKEN_ENV in output
    code, output = _predict(*base)
    assert code == EXIT_SERVER and "HTTP 401" in _one_line_error(output)
    code, output = _predict(*base, env={TOKEN_ENV: "edge:s3cret-pw"})
    assert code == EXIT_OK and "s3cret" not in output, output
    assert len(_rows(tmp_path / "p.csv")) == 4


def test_a_missing_study_is_an_error_row(pacs: dict, tmp_path: Path) -> None:
    code, output = _predict(pacs["server"].source, "--study", "1.2.826.0.1.3680043.8.498.7001", "--study", "1.2.3.999",
                            "--model", str(pacs["model"]), "--out", str(tmp_path / "p.csv"))  # fmt: skip
    assert code == EXIT_SOME_FAILED, output
    failed = [row for row in _rows(tmp_path / "p.csv") if row["error"]]
    assert [(row["path"], row["error"]) for row in failed] == [
        (f"{pacs['server'].dicomweb}/studies/1.2.3.999",
         f"study 1.2.3.999 not found on {pacs['server'].dicomweb} (QIDO-RS: no match)")]  # fmt: skip
    code, output = _predict(pacs["server"].source, "--study", "1.2.3.999", "--model", str(pacs["model"]),
                            "--out", str(tmp_path / "q.csv"))  # fmt: skip
    assert code == EXIT_NOTHING_READ, output


def test_a_truncated_retrieve_is_an_error_row_and_stores_no_partial_result(
    pacs: dict, tmp_path: Path
) -> None:
    study = "1.2.826.0.1.3680043.8.498.7002"
    before = len(_stored_reports(pacs).get(f"{study}.1", []))
    with _orthanc.FaultProxy(pacs["server"].http_url, truncate=True) as cut:
        code, output = _predict(cut.source, "--study", study, "--model", str(pacs["model"]),
                                "--out", str(tmp_path / "p.csv"), "--store", "--force")  # fmt: skip
    assert code == EXIT_NOTHING_READ, output
    series_path = "/series/1.2.826.0.1.3680043.8.498.7002.1"
    retrieves = [path for _, path in cut.requests if series_path in path and not path.endswith("/metadata")]
    # the series in one request, cut; then each instance alone, cut too
    assert sum(path.endswith(series_path) for path in retrieves) == 1
    assert sum("/instances/" in path for path in retrieves) == 4
    rows = _rows(tmp_path / "p.csv")
    assert len(rows) == 4 and all(
        row["error"].startswith("retrieve failed") and not row["label"] for row in rows
    )
    (series,) = _rows(tmp_path / "p.series.csv")
    assert series["error"].startswith("no slice could be classified") and not series["label"]
    assert "SRs stored: 0, already there: 0, failed: 0" in output
    assert len(_stored_reports(pacs).get(f"{study}.1", [])) == before


def test_a_rejected_store_is_reported_and_leaves_no_sr(pacs: dict, tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.7002"
    before = len(_stored_reports(pacs).get(f"{study}.1", []))
    with _orthanc.FaultProxy(pacs["server"].http_url, reject_store=True) as rejecting:
        code, output = _predict(rejecting.source, "--study", study, "--model", str(pacs["model"]),
                                "--out", str(tmp_path / "p.csv"), "--store", "--force")  # fmt: skip
    assert code == EXIT_SERVER, output
    assert "SRs stored: 0, already there: 0, failed: 1" in output
    assert re.search(
        r"not stored series 1\.2\.826\.0\.1\.3680043\.8\.498\.7002\.1: .*answered HTTP 409 to the store",
        output,
    )
    assert len(_rows(tmp_path / "p.csv")) == 4  # the rows are there; only the SR is missing
    assert len(_stored_reports(pacs).get(f"{study}.1", [])) == before


def test_bad_selections_say_which_option(pacs: dict, tmp_path: Path) -> None:
    base = ["--model", str(pacs["model"]), "--out", str(tmp_path / "p.csv")]
    for args, message in [
        ([pacs["server"].source], "needs --study UID (one or more) or --since DATE"),
        ([pacs["server"].source, "--since", "last week"], "--since must be a date"),
        ([pacs["server"].source, "--study", "not-a-uid"], "--study 'not-a-uid' is not a DICOM UID"),
        (
            [pacs["server"].source, "--since", "2000-01-01", "--force"],
            "--force redoes stored results: it needs --store",
        ),
        (["dicomweb+ftp://x/dicom-web", "--since", "2000-01-01"], "is not a DICOMweb address"),
        (
            ["dicomweb+http://edge:pw@127.0.0.1:1/dicom-web", "--since", "2000-01-01"],
            "put no credentials in the DICOMweb address",
        ),
        ([str(pacs["folder"]), "--store"], "pass dicomweb+http://HOST:PORT/ROOT instead of a folder"),
    ]:
        code, output = _predict(*args, *base)
        assert code == EXIT_NOTHING_READ and message in _one_line_error(output), (args, output)


# --------------------------------------------------------------------------- stub servers


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers every GET from ``self.server.answer(path)``: (status, content type, body)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        status, content_type, body = self.server.answer(self.path)  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _stub_server(answer: Callable[[str], tuple[int, str, bytes]]) -> Iterator[tuple[str, list[str]]]:
    """A DICOMweb look-alike on 127.0.0.1 in a thread: (its dicomweb+ address, the paths asked for)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.answer, server.paths = answer, []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"dicomweb+http://127.0.0.1:{server.server_address[1]}/dicom-web", server.paths  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_login_page_or_a_bad_port_is_one_line_and_exit_code_4(tmp_path: Path) -> None:
    model = make_tiny_onnx(tmp_path / "model.onnx", ModelSpec(input_size=32))
    page = b"<html><body>Please log in</body></html>"
    base = ["--since", "2000-01-01", "--model", str(model), "--out", str(tmp_path / "p.csv")]
    with _stub_server(lambda path: (200, "text/html", page)) as (source, paths):
        code, output = _predict(source, *base)
    assert paths and paths[0].startswith("/dicom-web/studies?")
    assert code == EXIT_SERVER, output
    assert (
        "no usable answer to the study search (JSONDecodeError): is the address its DICOMweb root?"
        in _one_line_error(output)
    )
    code, output = _predict("dicomweb+http://127.0.0.1:99999/dicom-web", *base)
    assert code == EXIT_SERVER and "gave no usable answer to the study search" in _one_line_error(output)


def _study_json(uid: str) -> dict:
    return {"0020000D": {"vr": "UI", "Value": [uid]}}


def test_a_paged_study_search_is_read_to_its_last_page() -> None:
    from kidney_edge.runtime.dicomweb import DicomwebSource, Selection

    studies = [_study_json(f"1.2.3.{i}") for i in range(5)]

    def answer(path: str) -> tuple[int, str, bytes]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        if path.startswith("/dicom-web/studies?"):  # two per page, as a server with a page limit answers
            offset = int(query.get("offset", ["0"])[0])
            return 200, "application/dicom+json", json.dumps(studies[offset : offset + 2]).encode()
        return 200, "application/dicom+json", b"[]"  # no series in any study

    with _stub_server(answer) as (source, paths):
        pacs = DicomwebSource(source)
        try:
            pacs.list(Selection(since="2000-01-01"))
        finally:
            pacs.close()
    series_searches = sorted(path.split("/")[3] for path in paths if "/series" in path)
    assert series_searches == [f"1.2.3.{i}" for i in range(5)]


def test_credentials_or_a_query_in_the_address_are_refused_and_never_echoed(tmp_path: Path) -> None:
    base = [
        "--since",
        "2000-01-01",
        "--model",
        str(tmp_path / "model.onnx"),
        "--out",
        str(tmp_path / "p.csv"),
    ]
    for source, message in [
        ("dicomweb+http://user:secret@127.0.0.1:1/dicom-web", "put no credentials in the DICOMweb address"),
        ("dicomweb+HTTP://user:secret@127.0.0.1:1/dicom-web", "put no credentials in the DICOMweb address"),
        ("DICOMWEB+http://user:secret@127.0.0.1:1/dicom-web", "put no credentials in the DICOMweb address"),
        ("dicomweb+user:secret@127.0.0.1:1/dicom-web", "put no credentials in the DICOMweb address"),
        ("dicomweb+http://127.0.0.1:1/dicom-web?token=secret", "may not carry a query string"),
        ("dicomweb+ftp://secret/dicom-web", "the address is not a DICOMweb address"),
    ]:
        code, output = _predict(source, *base)
        assert code == EXIT_NOTHING_READ and message in _one_line_error(output), (source, output)
        assert "secret" not in output, (source, output)


def test_report_uids_follow_the_rules_that_made_the_label() -> None:
    from kidney_edge.runtime.dicom_sr import ModelIdentity, report_uids

    identity = ModelIdentity("m.onnx", "ab" * 32, 1, "0.1", "argmax", "top-3 mean of slice probabilities")
    uids = report_uids("1.2.3", "1.2.3.4", identity)
    assert report_uids("1.2.3", "1.2.3.4", identity) == uids
    for changed in (replace(identity, series_rule="max of slice probabilities"),
                    replace(identity, decision_rule="Stone at 0.3")):  # fmt: skip
        other = report_uids("1.2.3", "1.2.3.4", changed)
        assert other.sop_uid != uids.sop_uid and other.series_uid != uids.series_uid


# Last in the file: it adds SRs to the session's Orthanc, which the store tests above count.
def test_a_changed_series_rule_stores_a_new_sr_and_an_unchanged_one_nothing(
    pacs: dict, tmp_path: Path
) -> None:
    study = "1.2.826.0.1.3680043.8.498.7002"
    args = ["--study", study, "--model", str(pacs["model"]), "--store"]
    code, output = _predict(pacs["server"].source, *args, "--out", str(tmp_path / "a.csv"))
    assert code == EXIT_OK and "SRs stored: " in output, output
    before = len(_stored_reports(pacs)[f"{study}.1"])
    code, output = _predict(
        pacs["server"].source, *args, "--aggregate", "max", "--out", str(tmp_path / "b.csv")
    )
    assert code == EXIT_OK and "SRs stored: 1, already there: 0, failed: 0" in output, output
    code, output = _predict(
        pacs["server"].source, *args, "--aggregate", "max", "--out", str(tmp_path / "c.csv")
    )
    assert code == EXIT_OK and "SRs stored: 0, already there: 1, failed: 0" in output, output
    reports = _stored_reports(pacs)[f"{study}.1"]
    assert len(reports) == before + 1
    assert any(
        "series rule: max of slice probabilities" in " ".join(_content(r)["parameters"]) for r in reports
    )
