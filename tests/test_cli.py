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
