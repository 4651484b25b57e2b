"""``predict --engine ray``: the local engine's rows, computed by Ray Data actors in local mode.

One Ray (``ray.init(num_cpus=2)``) serves the whole test session, because each start costs
seconds. Its workers run a setup hook that makes reading a file named ``kills-worker*`` end the
worker process: the stand-in for a decoder crash or an out-of-memory kill.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from _factories import make_tiny_onnx
from test_runtime import make_bad_files, read_rows, write_gray_images
from typer.testing import CliRunner

from kidney_edge.errors import InputError
from kidney_edge.runtime import PredictOptions, predict_folder
from kidney_edge.spec import ModelSpec

ray = pytest.importorskip("ray")

from kidney_edge.runtime.ray_engine import WORKER_DIED, import_ray, predict_with_ray  # noqa: E402

POISON = "kills-worker"
TOLERANCE = 1e-6  # probabilities, confidence and OOD score: ray vs local


def _die_on_poison() -> None:
    """Worker setup hook: reading a file named ``kills-worker*`` ends the worker process."""
    import kidney_edge.imaging as imaging

    load_image = imaging.load_image

    def load_or_die(source: Any, spec: Any) -> Any:
        if os.path.basename(str(source)).startswith(POISON):
            os._exit(1)
        return load_image(source, spec)

    imaging.load_image = load_or_die


@pytest.fixture(scope="session")
def ray_local() -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"worker_process_setup_hook": _die_on_poison},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("model") / "model.onnx", ModelSpec(input_size=32))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 gray images and one file of each bad kind (errors rows in both engines)."""
    folder = tmp_path_factory.mktemp("images")
    write_gray_images(folder, 20)
    make_bad_files(folder / "bad")
    return folder


@pytest.fixture(scope="module")
def local_rows(model: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The local engine's JSONL rows (full float precision), keyed by path."""
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    predict_folder(images, PredictOptions(model=model, out=out, fmt="jsonl", batch_size=4))
    return {row["path"]: row for row in read_jsonl(out)}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_rows(ray_rows: list[dict], local: dict[str, dict]) -> None:
    """Same paths once each, same labels and errors, scores within TOLERANCE; any order."""
    paths = [row["path"] for row in ray_rows]
    assert len(paths) == len(set(paths)) and set(paths) == set(local)
    for row in ray_rows:
        expected = local[row["path"]]
        assert list(row) == list(expected)
        for column, value in expected.items():
            if isinstance(value, float):
                assert abs(float(row[column]) - value) <= TOLERANCE, (row["path"], column)
            else:
                assert row[column] == value, (row["path"], column)


def as_typed(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row's cells as the JSONL types: empty -> None, numbers -> float."""
    from kidney_edge.runtime.rows import is_number_column

    typed: dict[str, Any] = {}
    for column, cell in row.items():
        if cell == "":
            typed[column] = None
        elif is_number_column(column):
            typed[column] = float(cell)
        else:
            typed[column] = cell
    return typed


def test_ray_rows_equal_local_rows_bad_files_included(
    ray_local: Any, model: Path, images: Path, local_rows: dict[str, dict], tmp_path: Path
) -> None:
    out = tmp_path / "ray.jsonl"
    summary = predict_with_ray(
        images, PredictOptions(model=model, out=out, fmt="jsonl", batch_size=3), actors=2
    )
    rows = read_jsonl(out)
    assert_same_rows(rows, local_rows)
    failed = {Path(row["path"]).name for row in rows if row["error"]}
    assert failed == {"zero.jpg", "truncated.jpg", "text.png", "bomb.png", "broken.dcm"}
    assert (summary.predicted, summary.failed, summary.actors, summary.fatal_files) == (20, 5, 2, 0)
    assert summary.exit_code == 3 and sum(summary.class_counts.values()) == 20


def test_ray_summary_counts_labels_under_local_rule(ray_local: Any, images: Path, tmp_path: Path) -> None:
    """With an OOD detector that rejects nothing, both engines list ``unknown 0``: one summary rule."""
    from test_ood import _model_with_detector

    from kidney_edge.ood import OodDetector, OodMethod
    from kidney_edge.spec import UNKNOWN_LABEL

    model = _model_with_detector(tmp_path / "ood.onnx", OodDetector(OodMethod.MSP, 1.0))
    local = predict_folder(images / "left", PredictOptions(model=model, out=tmp_path / "local.csv"))
    on_ray = predict_with_ray(
        images / "left", PredictOptions(model=model, out=tmp_path / "ray.csv"), actors=1
    )
    assert on_ray.class_counts == local.class_counts and on_ray.class_counts[UNKNOWN_LABEL] == 0
    assert list(on_ray.class_counts) == [*local.class_names, UNKNOWN_LABEL]
    assert (on_ray.model, on_ray.threads, on_ray.precision) == (local.model, 1, local.precision)


def test_resume_after_a_partial_line_completes_each_file_once(
    ray_local: Any, model: Path, images: Path, local_rows: dict[str, dict], tmp_path: Path
) -> None:
    out = tmp_path / "p.csv"
    predict_folder(images, PredictOptions(model=model, out=out, batch_size=4))
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:9]) + lines[9][:15])  # header, 8 rows, half a row
    summary = predict_with_ray(images, PredictOptions(model=model, out=out, batch_size=4, resume=True))
    assert (summary.skipped, summary.processed) == (8, 17)
    assert_same_rows([as_typed(row) for row in read_rows(out)], local_rows)


def test_parquet_from_a_uri_source_then_resume_skips_everything(
    ray_local: Any, model: Path, images: Path, local_rows: dict[str, dict], tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "p.parquet"
    summary = predict_with_ray(
        f"file://{images}", PredictOptions(model=model, out=out, fmt="parquet", batch_size=5)
    )
    assert summary.processed == 25 and sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"]
    table = pq.read_table(out)
    assert table.schema.field("p_Tumor").type == "double" and table.schema.field("error").type == "string"
    rows = [{**row, "path": row["path"].removeprefix("file://")} for row in table.to_pylist()]
    assert_same_rows(rows, local_rows)
    again = predict_with_ray(
        f"file://{images}", PredictOptions(model=model, out=out, fmt="parquet", resume=True)
    )
    assert (again.skipped, again.processed) == (25, 0) and pq.read_table(out).num_rows == 25


def test_a_file_that_kills_its_worker_becomes_an_error_row(
    ray_local: Any, model: Path, images: Path, local_rows: dict[str, dict], tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    shutil.copytree(images / "left", folder)
    shutil.copy(images / "left" / "slice-001.jpg", folder / f"{POISON}.jpg")
    out = tmp_path / "p.jsonl"
    summary = predict_with_ray(folder, PredictOptions(model=model, out=out, fmt="jsonl", batch_size=4))
    rows = {Path(row["path"]).name: row for row in read_jsonl(out)}
    assert rows.pop(f"{POISON}.jpg")["error"] == WORKER_DIED
    expected = {Path(path).name: row for path, row in local_rows.items() if "/left/" in path}
    assert_same_rows([{**row, "path": str(images / "left" / name)} for name, row in rows.items()],
                     {str(images / "left" / name): row for name, row in expected.items()})  # fmt: skip
    assert (summary.fatal_files, summary.predicted, summary.exit_code) == (1, 10, 3)
    assert summary.second_pass >= 1


def test_cli_engine_ray_and_its_option_errors(
    ray_local: Any, model: Path, images: Path, tmp_path: Path
) -> None:
    from kidney_edge.cli import app

    runner = CliRunner()
    out = tmp_path / "p.csv"
    args = ["predict", str(images / "left"), "--model", str(model), "--out", str(out)]
    result = runner.invoke(app, [*args, "--engine", "ray", "--actors", "1", "--report"])
    assert result.exit_code == 0, result.output
    assert len(read_rows(out)) == 10 and "1 actors" in result.output
    page = (tmp_path / "p.report.html").read_text(encoding="utf-8")  # the same driver writes it
    assert '<td id="total">10</td>' in page and "This engine returns rows only" in page
    refused = runner.invoke(
        app,
        [*args, "--engine", "ray", "--format", "parquet", "--out", str(tmp_path / "p.parquet"), "--report"],
    )
    assert refused.exit_code == 2 and "--report reads the rows back" in refused.output, refused.output
    for extra, fragment in (
        (["--actors", "2"], "--engine ray"),
        (["--format", "parquet"], "--engine ray"),
        (["--engine", "ray", "--workers", "2"], "--workers"),
    ):
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 2 and fragment in result.output, result.output


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(InputError, match=r'pip install "kidney-edge\[ray\]"'):
        import_ray()
