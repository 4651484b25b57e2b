"""The CLI shell: every command has help, errors become one line and the right exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kidney_edge.cli import app

COMMANDS = [
    "synth",
    "split",
    "train",
    "evaluate",
    "export",
    "predict",
    "benchmark",
    "serve",
    "info",
    "doctor",
    "demo",
]
runner = CliRunner()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_real_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.splitlines()) > 4


def test_info_describes_an_image_as_json(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "slice.png")
    result = runner.invoke(app, ["info", str(tmp_path / "slice.png"), "--json"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.output)
    assert described["kind"] == "image" and described["format"] == "PNG" and described["size"] == [30, 40]


def test_input_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2
    assert "no such file" in result.output and "Traceback" not in result.output
    (tmp_path / "notes.txt").write_text("hello")
    result = runner.invoke(app, ["info", str(tmp_path / "notes.txt")])
    assert result.exit_code == 2 and "not a model or image file" in result.output


def test_python_dash_m_entry_point() -> None:
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, "-m", "kidney_edge", "--help"], capture_output=True, text=True
    )
    assert completed.returncode == 0 and "predict" in completed.stdout


def test_command_table_names_every_command_and_its_module() -> None:
    from kidney_edge.cli import COMMAND_MODULES

    registered = {
        c.callback.__name__: c.callback.__module__.rsplit(".", 1)[1] for c in app.registered_commands
    }
    assert registered == COMMAND_MODULES  # main() imports only the module of the command it runs


def test_version_and_doctor_run_without_torch(tmp_path: Path) -> None:
    from test_import_graph import _CLI_COMMAND, run_refusing_heavy

    from kidney_edge import __version__

    version = run_refusing_heavy(_CLI_COMMAND, "--version", cwd=tmp_path)
    assert version["exit_code"] == 0 and version["attempts"] == [] and version["loaded"] == []
    assert f"kidney-edge {__version__}" in version["output"]

    graph = run_refusing_heavy(_CLI_COMMAND, "doctor", "--json", cwd=tmp_path)
    assert graph["exit_code"] == 0, graph["output"]
    assert graph["attempts"] == [] and graph["loaded"] == [], "doctor imported torch, Ray or sklearn"
    report = json.loads(graph["output"].split("IMPORT-GRAPH ")[0])
    assert report["kidney_edge"] == __version__
    # torch and Ray are found in the installed metadata although their import was refused
    from importlib import metadata

    for package in ("numpy", "onnxruntime", "torch", "pydicom", "ray"):
        try:
            assert report["packages"][package] == metadata.version(package)
        except metadata.PackageNotFoundError:
            assert report["packages"][package] is None
    assert "CPUExecutionProvider" in report["onnxruntime_providers"]
    assert {"avx2", "avx512_vnni"} <= set(report["cpu"]["isa_flags"]) and isinstance(
        report["cpu"]["vnni"], bool
    )
    assert report["threads"]["usable"] >= 1 and "chromium" in report["programs"]
    assert (
        set(report["extras"]) >= {"train", "serve", "dicom", "ray", "dev"} and "all" not in report["extras"]
    )

    table = run_refusing_heavy(_CLI_COMMAND, "doctor", cwd=tmp_path)
    assert table["exit_code"] == 0 and table["attempts"] == []
    for row in ("onnxruntime providers", "usable threads", "CPU features", "extras installed", "chromium"):
        assert row in table["output"]


def test_old_spellings_run_end_to_end(tmp_path: Path) -> None:
    from test_runtime import make_tiny_onnx, write_gray_images

    model = make_tiny_onnx(tmp_path / "export" / "run" / "model.onnx")
    write_gray_images(tmp_path / "images", 2)
    record = tmp_path / "bench.json"
    old = ["benchmark", "--model", str(model), "--batch-sizes", "1,2", "--threads", "1", "--warmup", "0",
           "--iterations", "1", "--images", str(tmp_path / "images"), "--json", str(record)]  # fmt: skip
    result = runner.invoke(app, old, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    settings = json.loads(record.read_text())["settings"]
    assert settings["batch_sizes"] == [1, 2] and settings["threads"] == [1]
    assert json.loads(record.read_text())["pipeline"]["images"] == 2
    for old_spelling, new in (("--batch-sizes 1,2", "--batch-size 1 --batch-size 2"),
                              ("--images", "the positional FOLDER"), ("--json", "--out")):  # fmt: skip
        assert f"{old_spelling} is now {new}" in result.stderr

    result = runner.invoke(app, ["info", str(model), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["kind"] == "onnx"
    assert f"is now --model {model}" in result.stderr
    by_folder = runner.invoke(app, ["info", "--model", str(model.parent), "--json"])
    assert by_folder.exit_code == 0 and by_folder.stderr == ""
    assert json.loads(by_folder.stdout)["path"] == str(model)


def test_usage_lines_show_plain_metavars() -> None:
    assert (
        "Usage: kidney-edge predict [OPTIONS] FOLDER"
        in runner.invoke(app, ["predict", "--help"], prog_name="kidney-edge").output
    )
    assert "[OPTIONS] DATA" in runner.invoke(app, ["evaluate", "--help"]).output
    assert "[OPTIONS] [FOLDER]" in runner.invoke(app, ["benchmark", "--help"]).output
    assert "[OPTIONS] [DATA]..." in runner.invoke(app, ["export", "--help"]).output


def test_export_gate_options_are_checked_with_the_flag_named(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    for flag, value in (("--max-int8-drop", "2"), ("--int8-min-agreement", "1.5"), ("--int8-gate-images", "0")):
        result = runner.invoke(app, ["export", "--model", str(tmp_path / "run"), flag, value])
        assert result.exit_code == 2 and flag in result.output, result.output
