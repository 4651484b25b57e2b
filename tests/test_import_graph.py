"""The layer boundary as a test: the edge runtime and its commands never import the training stack,
nor Ray (the runtime's modules, ``kidney_edge.runtime.ray_engine`` included, import it lazily).

Each check runs in a fresh interpreter whose import system refuses torch, torchvision, sklearn
and matplotlib, and records every attempt, so that an import caught by a ``try`` still fails
the test. ``predict``, ``info`` and ``benchmark`` are really run, on a tiny ONNX model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_runtime import REPO, make_tiny_onnx, write_gray_images

from kidney_edge.spec import ModelSpec

# The `ray` extra (pyarrow comes with it): only `predict --engine ray` may import it.
RAY_EXTRA = ("ray", "pyarrow")
HEAVY = ("torch", "torchvision", "sklearn", "matplotlib", *RAY_EXTRA)
# What the runtime may import of kidney_edge: the spec / imaging / errors / io layer and itself.
RUNTIME_LAYER = ("kidney_edge", "kidney_edge.errors", "kidney_edge.spec", "kidney_edge.imaging",
                 "kidney_edge.io_utils", "kidney_edge.runtime")  # fmt: skip

_PRELUDE = f"""
import importlib, json, pkgutil, sys

HEAVY = {HEAVY!r}
attempts = []


class RefuseHeavy:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            attempts.append(name)
            raise ImportError(f"{{name}} is refused: the edge runtime must not import it")
        return None


sys.meta_path.insert(0, RefuseHeavy())


def report(**extra):
    loaded = sorted(name for name in sys.modules if name.partition(".")[0] in HEAVY)
    ours = sorted(name for name in sys.modules if name.startswith("kidney_edge"))
    print("IMPORT-GRAPH " + json.dumps({{"attempts": attempts, "loaded": loaded, "ours": ours, **extra}}))
"""

_RUNTIME_GRAPH = """
import kidney_edge.runtime
from kidney_edge.imaging import preprocess
from kidney_edge.spec import ModelSpec

for module in pkgutil.walk_packages(kidney_edge.runtime.__path__, "kidney_edge.runtime."):
    importlib.import_module(module.name)
preprocess(sys.argv[1], ModelSpec(input_size=32))
report()
"""

_CLI_COMMAND = """
from kidney_edge.cli import main

sys.argv = ["kidney-edge", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code or 0
report(exit_code=code)
"""


def run_refusing_heavy(script: str, *args: str, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    completed = subprocess.run(
        [sys.executable, "-c", _PRELUDE + script, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    lines = [line for line in completed.stdout.splitlines() if line.startswith("IMPORT-GRAPH ")]
    assert lines, completed.stdout + completed.stderr
    return {**json.loads(lines[-1].removeprefix("IMPORT-GRAPH ")), "output": completed.stdout}


def test_runtime_package_imports_only_its_own_layer(tmp_path: Path) -> None:
    (image,) = write_gray_images(tmp_path / "images", 1)
    graph = run_refusing_heavy(_RUNTIME_GRAPH, str(image), cwd=tmp_path)
    assert graph["attempts"] == [] and graph["loaded"] == []
    outside = [name for name in graph["ours"] if not name.startswith(RUNTIME_LAYER)]
    assert outside == [], f"the runtime imports layers above it: {outside}"
    assert "kidney_edge.runtime.predict" in graph["ours"]  # the walk did reach the modules


@pytest.fixture(scope="module")
def edge_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edge")
    model = make_tiny_onnx(root / "export" / "run" / "model.onnx", ModelSpec(input_size=32))
    write_gray_images(root / "images", 6)
    return {"root": root, "model": model, "images": root / "images"}


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "{images}", "--model", "{model}", "--out", "{root}/p.csv"],
        ["info", "{model}", "--json"],
        ["info", "{images}/left/slice-001.jpg"],
        ["benchmark", "--model", "{model}", "--batch-sizes", "1,2", "--threads", "1", "--warmup", "0",
         "--iterations", "2", "--images", "{images}"],
    ],
    ids=["predict", "info-onnx", "info-image", "benchmark"],
)  # fmt: skip
def test_edge_commands_run_without_the_training_stack(
    command: list[str], edge_files: dict[str, Path]
) -> None:
    args = [part.format(**edge_files) for part in command]
    graph = run_refusing_heavy(_CLI_COMMAND, *args, cwd=edge_files["root"])
    assert graph["exit_code"] == 0, graph["output"]
    assert graph["attempts"] == [], f"{command[0]} tried to import {graph['attempts']}"
    assert graph["loaded"] == []


def test_predict_writes_series_rows_without_the_training_stack(
    edge_files: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("pydicom")
    import numpy as np

    from kidney_edge.phantoms.dicom_series import SliceHeader, write_slice

    for i in range(3):
        header = SliceHeader("P1", "1.2.3", "1.2.3.4", f"1.2.3.4.{i + 1}", i + 1, (0.0, 0.0, -5.0 * i))
        write_slice(tmp_path / "study" / header.sop_uid, np.full((16, 16), 40.0), header)
    args = [
        "predict",
        str(tmp_path / "study"),
        "--model",
        str(edge_files["model"]),
        "--out",
        str(tmp_path / "p.csv"),
    ]
    graph = run_refusing_heavy(_CLI_COMMAND, *args, cwd=tmp_path)
    assert graph["exit_code"] == 0, graph["output"]
    assert graph["attempts"] == [] and graph["loaded"] == []
    assert "kidney_edge.runtime.series" in graph["ours"]
    assert len((tmp_path / "p.series.csv").read_text().splitlines()) == 2  # header + the one series
