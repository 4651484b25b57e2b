"""Run-time precision choice: which model of an export folder runs, and why.

The decision logic runs with a fake probe (no timing in tests); one test checks that the real
probe measures both models, and predict runs end to end on a tiny export folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from _factories import make_conv_onnx
from test_runtime import write_gray_images
from typer.testing import CliRunner

from kidney_edge.errors import InputError
from kidney_edge.runtime import precision as precision_module
from kidney_edge.runtime.classifier import (
    INT8_FILE,
    MODEL_FILE,
    PARITY_FILE,
    REJECTED_INT8_FILE,
    OnnxClassifier,
)
from kidney_edge.runtime.hardware import CpuInfo
from kidney_edge.runtime.precision import (
    MIN_INT8_SPEEDUP,
    PROBE_CACHE_FILE,
    Precision,
    ProbeResult,
    TimedProbe,
    read_int8_gate,
    resolve_precision,
)


class FakeProbe:
    """Says INT8 runs ``speedup`` times as fast as fp32; counts its calls."""

    def __init__(self, speedup: float) -> None:
        self.speedup, self.calls = speedup, 0

    def __call__(self, fp32: OnnxClassifier, int8: OnnxClassifier, *, batch_size: int) -> ProbeResult:
        assert not fp32.is_int8 and int8.is_int8
        self.calls += 1
        return ProbeResult(2.0, 2.0 / self.speedup, batch_size, fp32.threads, batches=3, seconds=0.01)


def write_gate(folder: Path, *, passed: bool, model: str = INT8_FILE) -> None:
    """parity.json as export writes it: the INT8 gate record under "int8"."""
    failures = [] if passed else ["rule macro_f1 dropped 2.00 points (0.9700 -> 0.9500; allowed 1.00)"]
    delta = {"macro_f1": -0.002 if passed else -0.02, "positive_recall": 0.0, "accuracy": 0.0}
    record = {"passed": True, "int8": {"passed": passed, "failures": failures, "model": model,
                                       "positive_class": "Tumor", "n_images": 40,
                                       "delta": {"argmax": delta, "rule": delta}}}  # fmt: skip
    (folder / PARITY_FILE).write_text(json.dumps(record))


@pytest.fixture()
def export_dir(tmp_path: Path) -> Path:
    """model.onnx + model.int8.onnx (a small conv net and its dynamic-quantized copy) + a passed gate."""
    folder = tmp_path / "export" / "run"
    make_conv_onnx(folder / MODEL_FILE, int8_sibling=True)
    write_gate(folder, passed=True)
    return folder


def choose(folder: Path, precision: str = "auto", probe: FakeProbe | None = None, **options):
    return resolve_precision(folder, precision, threads=1, probe=probe or FakeProbe(2.0), **options)


def test_auto_picks_int8_only_when_gate_passed_and_measured_faster(export_dir: Path) -> None:
    faster = FakeProbe(2.0)
    choice, classifier = choose(export_dir, probe=faster)
    assert choice.precision is Precision.INT8 and choice.path == export_dir / INT8_FILE
    assert classifier.is_int8 and classifier.path == choice.path  # the probe's own session
    assert faster.calls == 1 and choice.probe.speedup == pytest.approx(2.0) and not choice.probe_cached
    assert "gate passed" in choice.reason and "2.00x" in choice.reason and "faster" in choice.reason

    (export_dir / PROBE_CACHE_FILE).unlink()
    slower = FakeProbe(0.9)  # INT8 at 0.9x of fp32: the AVX2-without-VNNI case
    choice, classifier = choose(export_dir, probe=slower)
    assert choice.precision is Precision.FP32 and not classifier.is_int8
    assert "0.90x" in choice.reason and "not faster" in choice.reason

    (export_dir / PROBE_CACHE_FILE).unlink()
    marginal = FakeProbe(MIN_INT8_SPEEDUP - 0.02)  # within probe noise: not worth the accuracy risk
    assert choose(export_dir, probe=marginal)[0].precision is Precision.FP32


@pytest.mark.parametrize("gate", ["failed", "missing", "other-file"])
def test_auto_keeps_fp32_without_a_passed_gate_and_does_not_probe(export_dir: Path, gate: str) -> None:
    if gate == "failed":
        write_gate(export_dir, passed=False)
    elif gate == "missing":
        (export_dir / PARITY_FILE).unlink()
    else:
        write_gate(export_dir, passed=True, model=REJECTED_INT8_FILE)
    probe = FakeProbe(3.0)
    choice, classifier = choose(export_dir, probe=probe)
    assert choice.precision is Precision.FP32 and not classifier.is_int8
    assert probe.calls == 0 and choice.probe is None
    assert choice.gate.passed is (False if gate == "failed" else None)
    expected = {"failed": "dropped 2.00 points", "missing": "no parity.json", "other-file": "not proven"}
    assert expected[gate] in choice.reason


def test_forced_precision(export_dir: Path) -> None:
    probe = FakeProbe(0.5)
    choice, classifier = choose(export_dir, "int8", probe)
    assert choice.precision is Precision.INT8 and classifier.is_int8 and choice.warning is None
    assert choose(export_dir, "fp32", probe)[0].path == export_dir / MODEL_FILE
    assert probe.calls == 0  # forcing never probes

    write_gate(export_dir, passed=False)  # INT8 kept with --allow-int8-drop: forcing it warns
    choice, _ = choose(export_dir, "int8")
    assert choice.precision is Precision.INT8 and "without a passed accuracy gate" in choice.warning

    (export_dir / INT8_FILE).rename(export_dir / REJECTED_INT8_FILE)  # rejected at export: never loaded
    with pytest.raises(InputError, match="failed the accuracy gate.*--allow-int8-drop"):
        choose(export_dir, "int8")
    choice, _ = choose(export_dir, "auto")
    assert choice.precision is Precision.FP32 and REJECTED_INT8_FILE in choice.reason
    with pytest.raises(InputError, match="--precision must be one of auto, fp32, int8"):
        choose(export_dir, "fast")


def test_single_file_runs_as_given_and_must_match_a_forced_precision(export_dir: Path) -> None:
    choice, classifier = choose(export_dir / INT8_FILE)
    assert choice.precision is Precision.INT8 and classifier.is_int8 and "file given" in choice.reason
    assert choose(export_dir / MODEL_FILE, "fp32")[0].precision is Precision.FP32
    with pytest.raises(InputError, match="is an fp32 model but --precision int8.*export folder"):
        choose(export_dir / MODEL_FILE, "int8")
    with pytest.raises(InputError, match="no such file or export folder"):
        choose(export_dir / "missing.onnx")
    with pytest.raises(InputError, match="neither model.onnx nor model.int8.onnx"):
        choose(export_dir.parent)


def test_probe_cache_is_keyed_by_model_hash_and_machine(export_dir: Path, monkeypatch) -> None:
    probe = FakeProbe(2.0)
    choose(export_dir, probe=probe)
    choice, _ = choose(export_dir, probe=probe)
    assert probe.calls == 1 and choice.probe_cached and "cached probe" in choice.reason
    assert choice.precision is Precision.INT8  # the cached measurement decides the same way

    resolve_precision(export_dir, threads=2, probe=probe)  # another thread count: another machine key
    assert probe.calls == 2
    monkeypatch.setattr(
        precision_module,
        "cpu_info",
        lambda: CpuInfo("Other CPU", "x86_64", frozenset({"avx2"})),
    )
    choose(export_dir, probe=probe)  # another CPU model and instruction sets
    assert probe.calls == 3
    monkeypatch.undo()

    choose(export_dir, probe=probe)
    assert probe.calls == 3  # back on this machine: still cached
    import onnx

    int8 = onnx.load(str(export_dir / INT8_FILE))
    int8.doc_string = "re-quantized"
    onnx.save(int8, str(export_dir / INT8_FILE))
    choose(export_dir, probe=probe)  # same name, other bytes: the hash misses
    assert probe.calls == 4
    entries = json.loads((export_dir / PROBE_CACHE_FILE).read_text())["entries"]
    assert len(entries) == 4 and {e["key"]["threads"] for e in entries} == {1, 2}


def test_probe_cache_falls_back_to_the_temp_folder(export_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(precision_module.tempfile, "tempdir", str(tmp_path / "tmp"))
    (export_dir / PROBE_CACHE_FILE).mkdir()  # unwritable as a file, even for root
    probe = FakeProbe(2.0)
    choose(export_dir, probe=probe)
    choice, _ = choose(export_dir, probe=probe)
    assert probe.calls == 1 and choice.probe_cached
    (cached,) = (tmp_path / "tmp" / "kidney-edge").glob("precision-*.json")
    assert json.loads(cached.read_text())["entries"][0]["result"]["int8_ms_per_image"] == 1.0


def test_gate_summary_names_the_deltas(export_dir: Path) -> None:
    gate = read_int8_gate(export_dir)
    assert gate.passed is True
    assert (
        gate.summary
        == "INT8 accuracy gate passed at export (macro-F1 -0.20 pt, Tumor recall +0.00 pt, 40 test images)"
    )


def test_timed_probe_measures_both_models(export_dir: Path) -> None:
    fp32, int8 = (
        OnnxClassifier(export_dir / MODEL_FILE, threads=1),
        OnnxClassifier(export_dir / INT8_FILE, threads=1),
    )
    result = TimedProbe(min_batches=3, max_batches=5, budget_s=0.0)(fp32, int8, batch_size=2)
    assert result.batches == 3 and result.batch_size == 2 and result.threads == 1
    assert result.fp32_ms_per_image > 0 and result.int8_ms_per_image > 0 and 0 < result.seconds < 10


def test_predict_export_folder_end_to_end(export_dir: Path, tmp_path: Path) -> None:
    from kidney_edge.runtime import PredictOptions, predict_folder

    images = tmp_path / "images"
    write_gray_images(images, 6)
    out = tmp_path / "p.csv"
    summary = predict_folder(
        images, PredictOptions(model=export_dir, out=out, threads=1, probe=FakeProbe(2.0))
    )
    assert summary.precision == "int8" and summary.is_int8 and summary.model == export_dir / INT8_FILE
    assert "faster" in summary.precision_reason and summary.predicted == 6
    with open(out, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 6

    from kidney_edge.cli import app

    result = CliRunner().invoke(
        app, ["predict", str(images), "--model", str(export_dir), "--out", str(out), "--precision", "fp32"]
    )
    assert result.exit_code == 0, result.output
    assert "precision fp32: forced (--precision fp32)" in result.output and "(fp32)" in result.output
    write_gate(export_dir, passed=False)
    result = CliRunner().invoke(app, ["predict", str(images), "--model", str(export_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "precision fp32: INT8 accuracy gate failed at export" in " ".join(result.output.split())


def test_benchmark_takes_an_export_folder_and_a_precision(export_dir: Path, tmp_path: Path) -> None:
    from kidney_edge.runtime import run_benchmark

    images = tmp_path / "images"
    write_gray_images(images, 4)
    options = {"batch_sizes": (2,), "threads": (1,), "warmup": 0, "iterations": 2, "images_dir": images}
    record = run_benchmark(export_dir, precision="int8", **options)
    assert [row["precision"] for row in record["model_only"]] == ["int8"]
    assert record["pipeline"]["precision"] == "int8" and record["pipeline"]["images"] == 4
    write_gate(export_dir, passed=False)
    record = run_benchmark(export_dir, **options)  # auto: both timed, predict on the gate's choice
    assert {row["precision"] for row in record["model_only"]} == {"fp32", "int8"}
    assert (
        record["pipeline"]["precision"] == "fp32" and "gate failed" in record["pipeline"]["precision_reason"]
    )


def test_int8_runs_decode_jpegs_in_draft_mode(export_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from PIL import JpegImagePlugin

    from kidney_edge.runtime import PredictOptions, predict_folder

    requests = []
    original = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        requests.append((mode, size))
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    images = tmp_path / "images"
    jpegs = [path for path in write_gray_images(images, 5, size=256) if path.suffix == ".jpg"]
    summary = predict_folder(
        images, PredictOptions(model=export_dir, out=tmp_path / "p.csv", threads=1, precision="int8")
    )
    assert summary.is_int8 and summary.predicted == 5
    assert requests == [("L", (64, 64))] * len(jpegs)  # the spec's input size, gray: the INT8 file's own spec


def test_export_probe_is_reused_on_its_machine_and_probed_again_on_another_cpu(
    export_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from kidney_edge.runtime import hardware
    from kidney_edge.runtime.precision import machine_key

    made_on = hardware.cpu_kind()
    record = json.loads((export_dir / PARITY_FILE).read_text())
    record["int8"]["speed"] = {"speedup": 1.6, "fp32_ms_per_image": 3.2, "int8_ms_per_image": 2.0, "batch_size": 8,
                               "threads": 1, "cpu": made_on, "machine": machine_key(1)}  # as export records it
    (export_dir / PARITY_FILE).write_text(json.dumps(record))

    class KindProbe(FakeProbe):  # reports the CPU kind it runs on, as TimedProbe does
        def __call__(self, fp32, int8, *, batch_size):
            result = super().__call__(fp32, int8, batch_size=batch_size)
            return ProbeResult(**{**result.__dict__, "cpu": hardware.cpu_kind()})

    probe = KindProbe(2.0)
    choice, _ = choose(export_dir, probe=probe)
    assert probe.calls == 0 and choice.precision is Precision.INT8 and choice.probe.speedup == pytest.approx(1.6)
    assert "measured at export on this machine" in choice.reason and "made on" not in choice.reason

    cpuinfo = tmp_path / "cpuinfo"  # another CPU kind: a Zen 3 line, AVX2 without VNNI
    cpuinfo.write_text("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx2 fma\n")
    monkeypatch.setattr(hardware, "_CPUINFO", cpuinfo)
    other = hardware.cpu_kind()
    assert other.startswith("AMD EPYC 7B13 (AVX2, no VNNI,") and other != made_on
    choice, _ = choose(export_dir, probe=probe)
    assert probe.calls == 1 and choice.probe.cpu == other
    assert choice.reason.endswith(f"INT8 made on {made_on}, probed again on {other}")
    choice, _ = choose(export_dir, probe=probe)  # that probe is cached for this CPU kind
    assert probe.calls == 1 and "cached probe" in choice.reason
