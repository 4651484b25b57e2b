"""Edge runtime: OnnxClassifier, predict_folder and `kidney-edge predict`, all without torch.

Models here are tiny ONNX graphs built with onnx.helper (global average pool -> Gemm ->
temperature -> softmax) carrying a real ModelSpec in their metadata, so every test runs in
milliseconds and none of them needs PyTorch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _factories import SIZE, make_tiny_onnx
from PIL import Image

from kidney_edge.errors import InputError
from kidney_edge.spec import ONNX_METADATA_KEY, DecisionRule, ModelSpec

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("Cyst", "Normal", "Stone", "Tumor")


def write_gray_images(folder: Path, count: int, *, size: int = 48, seed: int = 0) -> list[Path]:
    """`count` gray JPEG/PNGs of varied brightness in two sub-folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        level = 255.0 * index / max(1, count - 1)
        pixels = np.clip(rng.normal(level, 20.0, size=(size, size + index % 7)), 0, 255).astype(np.uint8)
        suffix = ".png" if index % 5 == 0 else ".jpg"
        path = folder / ("left" if index % 2 else "right") / f"slice-{index:03d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").save(path)
        paths.append(path)
    return sorted(paths)


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> None:
    """A valid PNG header declaring width x height pixels, with no real image data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return make_tiny_onnx(tmp_path / "export" / "run1" / "model.onnx")


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_gray_images(folder, 24)
    return folder


# --------------------------------------------------------------------------- OnnxClassifier


def test_classifier_reads_spec_and_runs(model_path: Path) -> None:
    from kidney_edge.runtime import OnnxClassifier

    classifier = OnnxClassifier(model_path, threads=1)
    assert classifier.spec == ModelSpec(input_size=SIZE)
    assert classifier.path == model_path and classifier.input_size == SIZE and not classifier.is_int8
    batch = np.random.default_rng(0).normal(size=(5, 3, SIZE, SIZE)).astype(np.float32)
    logits, probabilities = classifier.run(batch)
    assert logits.shape == probabilities.shape == (5, 4)
    np.testing.assert_allclose(probabilities, classifier.spec.probabilities(logits), atol=1e-6)
    np.testing.assert_allclose(classifier.predict(batch), probabilities)
    with pytest.raises(InputError, match=r"expected input \(N, 3, 32, 32\)"):
        classifier.run(batch[:, :, :16])


def test_classifier_applies_stored_temperature(tmp_path: Path) -> None:
    from kidney_edge.runtime import OnnxClassifier

    spec = ModelSpec(input_size=SIZE, temperature=2.5)
    classifier = OnnxClassifier(make_tiny_onnx(tmp_path / "m.onnx", spec))
    logits, probabilities = classifier.run(np.ones((2, 3, SIZE, SIZE), np.float32))
    np.testing.assert_allclose(probabilities, spec.probabilities(logits), atol=1e-6)


def test_classifier_rejects_files_without_spec_or_not_onnx(tmp_path: Path) -> None:
    from kidney_edge.runtime import OnnxClassifier

    bare = make_tiny_onnx(tmp_path / "bare.onnx", metadata=False)
    with pytest.raises(InputError, match=ONNX_METADATA_KEY):
        OnnxClassifier(bare)
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a protobuf")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        OnnxClassifier(junk)
    with pytest.raises(InputError, match="not found"):
        OnnxClassifier(tmp_path / "missing.onnx")


def test_available_cpus_honours_affinity_and_cgroup_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kidney_edge.runtime import hardware

    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(hardware, "_CGROUP_V2_CPU_MAX", cpu_max)
    cpu_max.write_text("max 100000\n")
    assert hardware.available_cpus() == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU still needs one thread
    assert hardware.available_cpus() == 1
    cpu_max.write_text("6400000 100000\n")  # quota above the affinity mask: the mask wins
    assert hardware.available_cpus() == affinity


# --------------------------------------------------------------------------- default model


def test_default_model_is_newest_export_and_message_when_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_dir: Path
) -> None:
    from kidney_edge.runtime import PredictOptions, find_default_model, predict_folder

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"kidney-edge demo.*kidney-edge export"):
        find_default_model()
    with pytest.raises(InputError, match="no model found"):
        predict_folder(image_dir)
    old = make_tiny_onnx(tmp_path / "export" / "b-old" / "model.onnx")
    new = make_tiny_onnx(tmp_path / "export" / "a-new" / "model.onnx", seed=1)
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert find_default_model() == Path("export/a-new/model.onnx")
    summary = predict_folder(image_dir, PredictOptions(out=tmp_path / "p.csv"))
    assert summary.model.resolve() == new.resolve() and summary.exit_code == 0


# --------------------------------------------------------------------------- predict_folder


def test_default_batch_holds_the_pixels_of_eight_224_px_images(image_dir: Path, tmp_path: Path) -> None:
    from kidney_edge.runtime import PredictOptions, predict_folder
    from kidney_edge.runtime.driver import default_batch_size

    assert [default_batch_size(size) for size in (64, 160, 224, 320, 448, 1024)] == [8, 8, 8, 3, 2, 1]
    large = make_tiny_onnx(tmp_path / "large" / "model.onnx", ModelSpec(input_size=448))
    summary = predict_folder(image_dir, PredictOptions(model=large, out=tmp_path / "p.csv"))
    assert summary.batch_size == 2 and summary.processed == 24  # a pair model's 448 px: 2 per call
    summary = predict_folder(image_dir, PredictOptions(model=large, out=tmp_path / "q.csv", batch_size=5))
    assert summary.batch_size == 5  # --batch-size wins


def test_predict_rows_match_direct_evaluation(model_path: Path, image_dir: Path, tmp_path: Path) -> None:
    from kidney_edge.imaging import preprocess_batch
    from kidney_edge.runtime import OnnxClassifier, PredictOptions, output_columns, predict_folder

    out = tmp_path / "predictions.csv"
    summary = predict_folder(image_dir, PredictOptions(model=model_path, out=out, batch_size=5, workers=2))
    rows = read_rows(out)
    assert list(rows[0]) == output_columns(CLASSES) == [
        "path", "label", "argmax_label", "confidence", "p_Cyst", "p_Normal", "p_Stone", "p_Tumor", "ood_score", "error",
    ]  # fmt: skip
    paths = [Path(row["path"]) for row in rows]
    assert paths == sorted(image_dir.rglob("*.*")) and len(paths) == 24
    probabilities = np.array([[float(row[f"p_{c}"]) for c in CLASSES] for row in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)

    classifier = OnnxClassifier(model_path)  # direct evaluation, one batch, no thread pool
    expected = classifier.predict(preprocess_batch(paths, classifier.spec))
    np.testing.assert_allclose(probabilities, expected, atol=2e-6)
    from kidney_edge.evaluation import predict_files  # the evaluation's own path, same files

    logits, spec = predict_files(model_path, paths, batch_size=7)
    np.testing.assert_allclose(probabilities, spec.probabilities(logits), atol=2e-6)
    labels = [CLASSES[i] for i in classifier.spec.decide(expected)]
    assert [row["label"] for row in rows] == labels
    assert [row["argmax_label"] for row in rows] == [CLASSES[i] for i in expected.argmax(axis=1)]
    assert len(set(labels)) >= 3  # the tiny model really separates the images
    confidences = [float(row["confidence"]) for row in rows]
    np.testing.assert_allclose(confidences, expected.max(axis=1), atol=2e-6)
    assert all(row["error"] == "" for row in rows)
    assert summary.exit_code == 0 and summary.predicted == 24 and summary.failed == 0
    assert summary.class_counts == {c: labels.count(c) for c in CLASSES}
    assert summary.decision_rule == "argmax" and summary.first_batch_s is not None


def test_threshold_rule_from_spec_decides_labels(tmp_path: Path, image_dir: Path) -> None:
    from kidney_edge.runtime import PredictOptions, predict_folder

    rule = DecisionRule(kind="threshold", positive_class="Tumor", threshold=0.05)
    model = make_tiny_onnx(tmp_path / "m.onnx", ModelSpec(input_size=SIZE, decision_rule=rule))
    summary = predict_folder(image_dir, PredictOptions(model=model, out=tmp_path / "p.csv"))
    rows = read_rows(tmp_path / "p.csv")
    for row in rows:
        p_tumor = float(row["p_Tumor"])
        probabilities = {c: float(row[f"p_{c}"]) for c in CLASSES}
        assert row["argmax_label"] == max(probabilities, key=probabilities.get)
        assert row["label"] == ("Tumor" if p_tumor >= 0.05 else row["argmax_label"])
        assert float(row["confidence"]) == float(row[f"p_{row['label']}"])
    assert any(row["label"] == "Tumor" and row["argmax_label"] != "Tumor" for row in rows)
    assert summary.decision_rule.startswith("Tumor if argmax is Tumor or p(Tumor) >= 0.0500")


def test_jsonl_output(model_path: Path, image_dir: Path, tmp_path: Path) -> None:
    from kidney_edge.runtime import PredictOptions, output_columns, predict_folder

    (image_dir / "empty.jpg").write_bytes(b"")
    out = tmp_path / "p.jsonl"
    summary = predict_folder(image_dir, PredictOptions(model=model_path, out=out, fmt="jsonl", batch_size=4))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 25 and all(list(row) == output_columns(CLASSES) for row in rows)
    good = [row for row in rows if row["error"] is None]
    assert len(good) == 24 and all(abs(sum(row[f"p_{c}"] for c in CLASSES) - 1) < 1e-5 for row in good)
    (bad,) = [row for row in rows if row["error"]]
    assert bad["label"] is None and "empty" in bad["error"] and summary.exit_code == 3


def make_bad_files(folder: Path) -> dict[str, str]:
    """One file of each bad kind -> a fragment its error message must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    bomb_png(folder / "bomb.png")
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 10)
    return {
        "zero.jpg": "empty",
        "truncated.jpg": "truncated",
        "text.png": "not an image",
        "bomb.png": "pixels",
        "broken.dcm": "DICOM",
    }


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the broken DICOM file
def test_every_bad_file_kind_gets_an_error_row_and_the_run_goes_on(
    model_path: Path, image_dir: Path, tmp_path: Path
) -> None:
    from kidney_edge.runtime import EXIT_SOME_FAILED, PredictOptions, predict_folder

    expected = make_bad_files(image_dir / "bad")
    out = tmp_path / "p.csv"
    summary = predict_folder(image_dir, PredictOptions(model=model_path, out=out, batch_size=3))
    rows = {Path(row["path"]).name: row for row in read_rows(out)}
    assert len(rows) == 24 + len(expected)
    for name, fragment in expected.items():
        assert fragment in rows[name]["error"], (name, rows[name]["error"])
        assert rows[name]["label"] == "" and rows[name]["p_Tumor"] == ""
    assert sum(row["error"] == "" for row in rows.values()) == 24
    assert summary.failed == len(expected) and summary.predicted == 24
    assert summary.exit_code == EXIT_SOME_FAILED == 3


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the broken DICOM file
def test_nothing_readable_exits_2_and_empty_folder_is_an_input_error(
    model_path: Path, tmp_path: Path
) -> None:
    from kidney_edge.runtime import PredictOptions, predict_folder

    make_bad_files(tmp_path / "bad")
    summary = predict_folder(tmp_path / "bad", PredictOptions(model=model_path, out=tmp_path / "p.csv"))
    assert summary.predicted == 0 and summary.failed == 5 and summary.exit_code == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        predict_folder(tmp_path / "empty", PredictOptions(model=model_path, out=tmp_path / "q.csv"))
    with pytest.raises(InputError, match="--batch-size"):
        predict_folder(tmp_path / "bad", PredictOptions(model=model_path, batch_size=0))


def test_predict_options_are_checked_once_and_each_engine_adds_only_its_own(tmp_path: Path) -> None:
    from kidney_edge.runtime import PredictOptions, predict_folder
    from kidney_edge.runtime.ray_engine import RayPredictConfig

    bad = [
        ({"batch_size": 0}, "--batch-size must be in 1..512, got 0"),
        ({"threads": 0}, "--threads must be >= 1, got 0"),
        ({"workers": 65}, "--workers must be in 1..64, got 65"),
        ({"fmt": "xml"}, "--format"),
        ({"precision": "fp16"}, "--precision"),
        ({"out": tmp_path}, "--out .* is a directory"),
    ]
    for options, message in bad:
        with pytest.raises(InputError, match=message):
            PredictOptions(**options)
    parquet = PredictOptions(fmt="parquet", out=tmp_path / "p.parquet")
    with pytest.raises(InputError, match="--format parquet needs --engine ray"):
        predict_folder(tmp_path, parquet)
    with pytest.raises(InputError, match="FOLDER .* is not a directory"):
        predict_folder(tmp_path / "missing")
    assert RayPredictConfig(str(tmp_path), parquet).threads == 1  # one onnxruntime thread per actor
    with pytest.raises(InputError, match="--format parquet writes a folder of part files"):
        RayPredictConfig(str(tmp_path), PredictOptions(fmt="parquet"))
    with pytest.raises(InputError, match="--workers sets local decode threads"):
        RayPredictConfig(str(tmp_path), PredictOptions(workers=2))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_resume_after_partial_last_line_yields_each_file_once(
    model_path: Path, image_dir: Path, tmp_path: Path, fmt: str
) -> None:
    from kidney_edge.runtime import PredictOptions, predict_folder

    reference = tmp_path / f"reference.{fmt}"
    predict_folder(image_dir, PredictOptions(model=model_path, out=reference, fmt=fmt))
    out = tmp_path / f"p.{fmt}"
    text = reference.read_text()
    lines = text.splitlines(keepends=True)
    out.write_text("".join(lines[:10]) + lines[10][:25])  # what a kill -9 mid-write leaves
    summary = predict_folder(image_dir, PredictOptions(model=model_path, out=out, fmt=fmt, resume=True))
    kept = 9 if fmt == "csv" else 10  # the CSV header is one of the 10 lines
    assert summary.skipped == kept and summary.processed == 24 - kept
    assert out.read_text() == text  # every row exactly once, in order, header once
    again = predict_folder(image_dir, PredictOptions(model=model_path, out=out, fmt=fmt, resume=True))
    assert again.skipped == 24 and again.processed == 0 and out.read_text() == text


def test_ctrl_c_keeps_finished_rows_and_resume_completes(
    model_path: Path, image_dir: Path, tmp_path: Path
) -> None:
    from kidney_edge.runtime import PredictOptions, predict_folder

    def interrupt_after_two_batches(done: int, total: int) -> None:
        if done >= 8:
            raise KeyboardInterrupt

    out = tmp_path / "p.jsonl"
    summary = predict_folder(
        image_dir,
        PredictOptions(model=model_path, out=out, fmt="jsonl", batch_size=4),
        progress=interrupt_after_two_batches,
    )
    assert summary.interrupted and summary.processed == 8
    assert len(out.read_text().splitlines()) == 8
    predict_folder(
        image_dir, PredictOptions(model=model_path, out=out, fmt="jsonl", batch_size=4, resume=True)
    )
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert sorted(paths) == paths and len(paths) == len(set(paths)) == 24


def test_decoding_stays_a_bounded_window_ahead_of_inference(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kidney_edge.runtime import predict

    folder = tmp_path / "many"
    write_gray_images(folder, 60, size=16)
    decoded: list[int] = []
    original = predict._load_batch

    buffers: set[int] = set()

    def counting_load(paths: list[Path], spec: ModelSpec, buffer: np.ndarray, read: object = None) -> object:
        loaded = original(paths, spec, buffer, read)
        decoded.append(len(paths))
        buffers.add(id(buffer))
        return loaded

    monkeypatch.setattr(predict, "_load_batch", counting_load)
    ahead: list[int] = []  # batches decoded but not yet written, seen after each write
    summary = predict.predict_folder(
        folder,
        predict.PredictOptions(model=model_path, out=tmp_path / "p.csv", batch_size=2, workers=1),
        progress=lambda done, total: ahead.append(len(decoded) - done // 2),
    )
    assert summary.predicted == 60 and len(decoded) == 30
    assert max(ahead) <= 2  # workers + 1: memory does not grow with the folder
    assert len(buffers) == 3  # window + 1 batch buffers, cycled: none allocated per batch


def test_resume_refuses_output_of_another_model(model_path: Path, image_dir: Path, tmp_path: Path) -> None:
    from kidney_edge.runtime import PredictOptions, predict_folder

    out = tmp_path / "p.csv"
    out.write_text("path,label,p_A,p_B,error\n")
    with pytest.raises(InputError, match="--resume"):
        predict_folder(image_dir, PredictOptions(model=model_path, out=out, resume=True))


# --------------------------------------------------------------------------- the driver and the rows schema


class ScriptedEngine:
    """A PredictEngine without a model: files named ``bad*`` get an error row, the others a fixed
    prediction; two rows per batch, and Ctrl-C after ``interrupt_after`` batches when given."""

    def __init__(self, spec: ModelSpec, interrupt_after: int | None = None) -> None:
        self.spec, self.interrupt_after, self.given = spec, interrupt_after, []

    def classify(self, paths: list[str], write: Any) -> None:
        from kidney_edge.runtime.rows import error_row, prediction_rows

        self.given.extend(paths)
        for batch, start in enumerate(range(0, len(paths), 2)):
            if batch == self.interrupt_after:
                raise KeyboardInterrupt
            chunk = paths[start : start + 2]
            probabilities = np.tile(np.float32([0.1, 0.2, 0.3, 0.4]), (len(chunk), 1))  # (k, 4): Tumor
            rows = prediction_rows(chunk, probabilities, self.spec)
            write(
                [
                    error_row(p, "unreadable", CLASSES) if "bad" in p else r
                    for p, r in zip(chunk, rows, strict=True)
                ]
            )


def _run_scripted(model: Path, out: Path, files: list[str], engine: ScriptedEngine, **job: Any) -> Any:
    from functools import partial

    from kidney_edge.runtime import OutputFormat, Precision, PredictSummary
    from kidney_edge.runtime.driver import PredictJob, run_predict

    options = {"out": out, "fmt": OutputFormat.CSV, "batch_size": 2, "resume": False, "model": model,
               "precision": Precision.AUTO, "threads": 1, "ood": True, **job}  # fmt: skip
    progress: list[tuple[int, int]] = []
    summary = run_predict(
        PredictJob(**options),
        list_files=lambda: files,
        start=lambda classifier, summary: engine,
        new_summary=partial(PredictSummary, workers=7),
        progress=lambda done, total: progress.append((done, total)),
    )
    return summary, progress


def test_driver_writes_counts_and_resumes_whatever_engine_classifies(
    model_path: Path, tmp_path: Path
) -> None:
    from kidney_edge.runtime import EXIT_SOME_FAILED, output_columns

    spec, out = ModelSpec(input_size=SIZE), tmp_path / "p.csv"
    files = ["/x/a.png", "/x/bad.png", "/x/c.png"]
    summary, progress = _run_scripted(model_path, out, files, ScriptedEngine(spec))
    rows = read_rows(out)
    assert list(rows[0]) == output_columns(CLASSES) and [r["path"] for r in rows] == files
    assert rows[1]["error"] == "unreadable" and rows[0]["p_Tumor"] == "0.400000"  # FLOAT_DIGITS decimals
    assert (summary.predicted, summary.failed, summary.total_files, summary.workers) == (2, 1, 3, 7)
    assert summary.class_counts == {"Cyst": 0, "Normal": 0, "Stone": 0, "Tumor": 2}
    assert summary.failures == [("/x/bad.png", "unreadable")] and summary.exit_code == EXIT_SOME_FAILED
    assert progress == [(0, 3), (2, 3), (3, 3)] and summary.model == model_path

    engine = ScriptedEngine(spec)
    resumed, _ = _run_scripted(model_path, out, [*files, "/x/d.png"], engine, resume=True)
    assert engine.given == ["/x/d.png"] and (resumed.skipped, resumed.processed) == (3, 1)
    assert [r["path"] for r in read_rows(out)] == [*files, "/x/d.png"]


def test_driver_turns_ctrl_c_into_a_summary_and_keeps_finished_rows(model_path: Path, tmp_path: Path) -> None:
    from kidney_edge.runtime import OutputFormat

    spec, out = ModelSpec(input_size=SIZE), tmp_path / "p.jsonl"
    files = [f"/x/{name}.png" for name in "abcde"]
    summary, _ = _run_scripted(
        model_path, out, files, ScriptedEngine(spec, interrupt_after=1), fmt=OutputFormat.JSONL
    )
    assert summary.interrupted and summary.processed == 2 and summary.wall_s > 0
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == files[:2]


def test_one_summary_rule_lists_every_label_up_front_and_refuses_others() -> None:
    from kidney_edge.runtime import PredictSummary
    from kidney_edge.runtime.rows import error_row, label_counts
    from kidney_edge.spec import UNKNOWN_LABEL

    assert label_counts(CLASSES, ood=False) == dict.fromkeys(CLASSES, 0)
    with_detector = label_counts(CLASSES, ood=True)
    assert list(with_detector) == [*CLASSES, UNKNOWN_LABEL] and set(with_detector.values()) == {0}
    summary = PredictSummary(out=Path("p.csv"), model=Path("m.onnx"), fmt="csv", decision_rule="argmax",
                             class_names=CLASSES, is_int8=False, ood_detector=None, threads=1, workers=1,
                             batch_size=2, class_counts=label_counts(CLASSES, ood=False))  # fmt: skip
    summary.record([{"path": "a", "label": "Cyst", "error": None}, error_row("b", "empty file", CLASSES)])
    assert (summary.predicted, summary.failed, summary.class_counts["Cyst"]) == (1, 1, 1)
    with pytest.raises(KeyError):  # unknown without a detector: a bug, not a new summary row
        summary.record([{"path": "c", "label": UNKNOWN_LABEL, "error": None}])


def test_number_columns_are_the_ones_rows_fill_with_floats() -> None:
    from kidney_edge.runtime.rows import error_row, is_number_column, output_columns, prediction_rows

    spec = ModelSpec(input_size=SIZE)
    probabilities = np.float32([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    rows = prediction_rows(["a", "b"], probabilities, spec, ood_scores=np.float32([0.5, 0.9]),
                           unknown=np.array([False, True]))  # fmt: skip
    rows.append(error_row("c", "empty file", CLASSES))
    for column in output_columns(CLASSES):
        kinds = {type(row[column]) for row in rows} - {type(None)}
        assert kinds == ({float} if is_number_column(column) else {str}), column


# Files that take the predictions schema from kidney_edge.runtime.rows: none may define its own
# float digits or spell a probability column.
_SCHEMA_USERS = ("runtime/predict.py", "runtime/ray_engine.py", "runtime/series.py", "runtime/driver.py",
                 "runtime/serve/service.py", "evaluation.py", "series_eval.py")  # fmt: skip


def schema_copies(source: str) -> list[str]:
    """Lines of ``source`` that define FLOAT_DIGITS or spell the ``p_`` column prefix themselves."""
    import re

    copy = re.compile(r"^\s*FLOAT_DIGITS\s*=|[\"']p_")
    return [line.strip() for line in source.splitlines() if copy.search(line)]


def test_the_predictions_schema_has_one_owner() -> None:
    planted = 'FLOAT_DIGITS = 6\nrow[f"p_{name}"]\nfrom kidney_edge.runtime.rows import FLOAT_DIGITS\n'
    assert schema_copies(planted) == ["FLOAT_DIGITS = 6", 'row[f"p_{name}"]']
    for name in _SCHEMA_USERS:
        assert schema_copies((REPO / "kidney_edge" / name).read_text()) == [], name


# --------------------------------------------------------------------------- CLI, in a process without torch

# Runs the CLI with `import torch` made to fail, as on an edge machine without PyTorch. An
# optional per-image delay makes a run slow enough to be killed part-way.
_NO_TORCH_CLI = """
import sys, time
sys.modules["torch"] = None  # any `import torch` now raises ImportError
delay = float(sys.argv.pop(1))
if delay:
    import kidney_edge.imaging as imaging
    original = imaging.preprocess
    def slow(*args, **kwargs):
        time.sleep(delay)
        return original(*args, **kwargs)
    imaging.preprocess = slow
from kidney_edge.cli import main
sys.argv[0] = "kidney-edge"
try:
    main()
finally:
    assert "torch" not in sys.modules or sys.modules["torch"] is None
"""


def run_cli_without_torch(*args: str, delay: float = 0.0, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-c", _NO_TORCH_CLI, str(delay), *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_predict_cli_works_without_torch(model_path: Path, image_dir: Path, tmp_path: Path) -> None:
    (image_dir / "zero.png").write_bytes(b"")
    out = tmp_path / "p.csv"
    process = run_cli_without_torch(
        "predict", str(image_dir), "--model", str(model_path), "--out", str(out), cwd=tmp_path
    )
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 3, output  # one bad file: the documented "some failed" code
    rows = read_rows(out)
    assert len(rows) == 25 and sum(row["error"] != "" for row in rows) == 1
    assert "failed" in output and "images/s" in output and "argmax" in output


def test_resume_after_kill_9_yields_each_file_once(model_path: Path, image_dir: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference.csv"
    args = ["predict", str(image_dir), "--model", str(model_path), "--batch-size", "2"]
    done = run_cli_without_torch(*args, "--out", str(reference), cwd=tmp_path)
    assert done.wait(timeout=60) == 0
    out = tmp_path / "p.csv"
    process = run_cli_without_torch(*args, "--out", str(out), delay=0.05, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    written = out.read_text().count("\n") - 1
    assert 5 <= written < 24, "the run should have been killed part-way"
    resumed = run_cli_without_torch(*args, "--out", str(out), "--resume", cwd=tmp_path)
    output, _ = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, output
    assert out.read_text() == reference.read_text()


def test_info_prints_the_decision_rule_in_words(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kidney_edge.cli import app

    rule = DecisionRule(kind="threshold", positive_class="Tumor", threshold=0.3125, target_recall=0.98)
    model = make_tiny_onnx(tmp_path / "m.onnx", ModelSpec(input_size=16, decision_rule=rule))
    result = CliRunner().invoke(app, ["info", str(model)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Tumor if argmax is Tumor or p(Tumor) >= 0.3125, else argmax" in result.output
