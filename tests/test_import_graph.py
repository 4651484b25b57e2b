"""The layer boundary as tests: the edge runtime and its commands never import the training stack,
nor Ray (the runtime's modules, ``kidney_edge.runtime.ray_engine`` included, import it lazily).

Two kinds of check, because each misses what the other sees:

- statically, every import statement in every runtime module, inside functions included, is
  held against the rule below (a lazy import of the checkpoint layer never runs in a test, but
  it would still put PyTorch on the edge);
- at run time, in a fresh interpreter whose import system refuses torch, torchvision, sklearn
  and matplotlib and records every attempt (an import caught by a ``try`` still fails the
  test), ``predict``, ``info`` and ``benchmark`` really run on a tiny ONNX model.

The static rule is seen failing: planted violations in a temporary copy of the package turn it red.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _factories import make_tiny_onnx
from test_runtime import REPO, write_gray_images

from kidney_edge.spec import ModelSpec

RUNTIME_PACKAGE = "kidney_edge.runtime"
# What the runtime may import of kidney_edge besides its own package, by exact module name:
# the package's __init__ (a name, not a prefix: every module starts with "kidney_edge") and the
# spec / imaging (with the region finder it calls) / errors / io layer. Everything else of
# kidney_edge (checkpoint, training, evaluation, export, dataset, quantize, report, backbones, ood
# fitting, ...) is above it.
RUNTIME_MAY_IMPORT = frozenset(
    {
        "kidney_edge",
        "kidney_edge.errors",
        "kidney_edge.spec",
        "kidney_edge.imaging",
        "kidney_edge.regions",
        "kidney_edge.io_utils",
    }
)
# Third-party packages no runtime module imports, not even inside a function: the training
# stack. scipy comes only with scikit-learn, so the base install lacks it.
NEVER_IN_RUNTIME = ("torch", "torchvision", "sklearn", "scipy", "matplotlib")
# The `ray` extra (pyarrow comes with it): only `predict --engine ray` may import it, lazily.
RAY_EXTRA = ("ray", "pyarrow")
# The `pacs` extra (a DICOMweb client and highdicom): only the DICOMweb modules may import it,
# and only inside functions, so that a base install imports them and runs a folder predict
# without it. Their own dependencies are not listed: pydicom is the `dicom` extra (series rows
# read it), and pydicom itself probes for requests when it is imported.
PACS_EXTRA = ("dicomweb_client", "highdicom")
PACS_MODULES = frozenset(
    {"kidney_edge/runtime/dicomweb.py", "kidney_edge/runtime/dicom_sr.py", "kidney_edge/runtime/pacs.py"}
)
# What the run-time checks refuse to import and report when attempted.
HEAVY = (*NEVER_IN_RUNTIME, *RAY_EXTRA, *PACS_EXTRA)
# The runtime's OOD scorer is numpy only (fitting, with scikit-learn and scipy, is kidney_edge.ood).
NUMPY_ONLY = {"kidney_edge/runtime/ood.py": ("numpy",)}


def in_runtime_layer(module: str) -> bool:
    """Whether a runtime module may import ``module`` (a kidney_edge module name)."""
    return (
        module in RUNTIME_MAY_IMPORT or module == RUNTIME_PACKAGE or module.startswith(RUNTIME_PACKAGE + ".")
    )


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, at any depth of the file.

    ``from P import name`` counts ``P.name`` too when that is a module of the tree under ``root``
    (``from kidney_edge import checkpoint``); relative imports are resolved against the file's
    package; ``importlib.import_module("...")`` and ``__import__("...")`` with a literal count too.
    """
    package = path.relative_to(root).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else ())
            base = ".".join(part for part in (base, node.module or "") if part)
            yield node.lineno, base
            for alias in node.names:
                if _is_module(root, f"{base}.{alias.name}"):
                    yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and _called_name(node) in ("import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def _is_module(root: Path, name: str) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def layer_violations(root: Path) -> list[str]:
    """``file:line: module`` for every import in ``root``/kidney_edge/runtime/** the layer rule forbids."""
    violations = []
    for path in sorted((root / "kidney_edge" / "runtime").rglob("*.py")):
        where = path.relative_to(root).as_posix()
        for line, module in imported_modules(path, root):
            top = module.partition(".")[0]
            allowed_here = NUMPY_ONLY.get(where)
            if top == "kidney_edge":
                ok = in_runtime_layer(module)
            elif top in PACS_EXTRA:
                ok = where in PACS_MODULES
            elif allowed_here is not None:
                ok = top in allowed_here or top in sys.stdlib_module_names
            else:
                ok = top not in NEVER_IN_RUNTIME
            if not ok:
                violations.append(f"{where}:{line}: {module}")
    return violations


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
    output = completed.stdout + completed.stderr
    return {**json.loads(lines[-1].removeprefix("IMPORT-GRAPH ")), "output": output}


def test_runtime_modules_import_nothing_above_their_layer_even_lazily() -> None:
    assert layer_violations(REPO) == []


# file of the copy -> (code appended to it, the import the rule must report)
PLANTED = {
    "lazy-checkpoint": (
        "kidney_edge/runtime/predict.py",
        "def _planted() -> None:\n    from kidney_edge.checkpoint import load_model  # noqa\n",
        "kidney_edge.checkpoint",
    ),
    "lazy-torch": ("kidney_edge/runtime/describe.py", "def _planted() -> None:\n    import torch  # noqa\n", "torch"),
    "submodule-by-from": ("kidney_edge/runtime/benchmark.py", "from kidney_edge import training  # noqa\n",
                          "kidney_edge.training"),
    "relative": ("kidney_edge/runtime/serve/app.py", "def _planted() -> None:\n    from ...export import x  # noqa\n",
                 "kidney_edge.export"),
    "ood-fitting": ("kidney_edge/runtime/classifier.py", "from kidney_edge.ood import fit_detector  # noqa\n",
                    "kidney_edge.ood"),
    "by-name": ("kidney_edge/runtime/series.py",
                "def _planted() -> None:\n    import importlib\n\n    importlib.import_module('kidney_edge.dataset')\n",
                "kidney_edge.dataset"),
    "lookalike-of-allowed": ("kidney_edge/runtime/predict.py", "import kidney_edge.spec_tables  # noqa\n",
                             "kidney_edge.spec_tables"),
    "pacs-extra-outside-dicomweb": ("kidney_edge/runtime/series.py",
                                    "def _planted() -> None:\n    import highdicom  # noqa\n", "highdicom"),
    "report-page-plots": ("kidney_edge/runtime/report_page.py", "def _planted() -> None:\n    import matplotlib  # noqa\n",
                          "matplotlib"),
    "triage-gradcam": ("kidney_edge/runtime/triage.py", "from kidney_edge.gradcam import overlay  # noqa\n",
                       "kidney_edge.gradcam"),
    "ood-scorer-beyond-numpy": ("kidney_edge/runtime/ood.py", "def _planted() -> None:\n    from PIL import Image  # noqa\n",
                                "PIL"),
}  # fmt: skip


@pytest.mark.parametrize("plant", sorted(PLANTED))
def test_a_planted_import_turns_the_layer_rule_red(plant: str, tmp_path: Path) -> None:
    where, code, module = PLANTED[plant]
    shutil.copytree(
        REPO / "kidney_edge", tmp_path / "kidney_edge", ignore=shutil.ignore_patterns("__pycache__")
    )
    assert layer_violations(tmp_path) == []  # the unchanged copy passes
    target = tmp_path / where
    original = target.read_text(encoding="utf-8")
    target.write_text(original + "\n\n" + code, encoding="utf-8")
    (violation,) = layer_violations(tmp_path)
    path, line, name = violation.split(":")
    assert (path, name.strip()) == (where, module) and int(line) > original.count("\n")  # the planted line


def test_runtime_package_imports_only_its_own_layer(tmp_path: Path) -> None:
    (image,) = write_gray_images(tmp_path / "images", 1)
    graph = run_refusing_heavy(_RUNTIME_GRAPH, str(image), cwd=tmp_path)
    assert graph["attempts"] == [] and graph["loaded"] == []
    outside = [name for name in graph["ours"] if not in_runtime_layer(name)]
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
        ["predict", "{images}", "--model", "{model}", "--out", "{root}/r.csv", "--report"],
        ["info", "{model}", "--json"],
        ["info", "{images}/left/slice-001.jpg"],
        ["benchmark", "--model", "{model}", "--batch-sizes", "1,2", "--threads", "1", "--warmup", "0",
         "--iterations", "2", "--images", "{images}"],
    ],
    ids=["predict", "predict-report", "info-onnx", "info-image", "benchmark"],
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


def test_train_extra_inputs_say_what_is_missing_without_torch(edge_files: dict[str, Path]) -> None:
    checkpoint = edge_files["root"] / "best.pt"
    checkpoint.write_bytes(b"never read: torch is refused first")
    info = run_refusing_heavy(_CLI_COMMAND, "info", str(checkpoint), cwd=edge_files["root"])
    assert info["exit_code"] == 2 and "describing a checkpoint needs PyTorch" in info["output"]
    benchmark = run_refusing_heavy(
        _CLI_COMMAND, "benchmark", "--model", str(edge_files["model"]), "--checkpoint", str(checkpoint),
        "--batch-sizes", "1", "--threads", "1", "--warmup", "0", "--iterations", "1", cwd=edge_files["root"],
    )  # fmt: skip
    assert benchmark["exit_code"] == 0, benchmark["output"]
    assert "PyTorch eager skipped: PyTorch is not installed" in benchmark["output"]
    for graph in (info, benchmark):  # torch was asked for only by the train-extra branch, and refused
        assert {name.partition(".")[0] for name in graph["attempts"]} == {"torch"} and graph["loaded"] == []
