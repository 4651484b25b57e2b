"""Command-line interface: ``kidney-edge COMMAND``. One module per command, all thin.

:func:`main` imports only the module of the command it runs: the command modules' own imports
cost start-up time (all of them ~0.3 s on a 2-core Xeon, before ``predict``'s first batch;
benchmarks/results/runtime.md). ``from kidney_edge.cli import app`` gives the app with every
command registered.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any

# command -> the module that registers it on `app`, in pipeline order: `kidney-edge --help`
# lists the commands in this order. A command missing here still runs (main then imports
# every module), only slower; tests/test_cli.py checks the table.
COMMAND_MODULES = {
    "synth": "data_cmd",
    "split": "data_cmd",
    "train": "train_cmd",
    "evaluate": "evaluate_cmd",
    "export": "export_cmd",
    "predict": "predict_cmd",
    "benchmark": "benchmark_cmd",
    "serve": "serve_cmd",
    "info": "info_cmd",
    "doctor": "doctor_cmd",
    "demo": "demo_cmd",
}


def _register(modules: list[str]) -> Any:
    for module in modules:
        import_module(f"kidney_edge.cli.{module}")
    from kidney_edge.cli._app import app

    return app


def __getattr__(name: str) -> Any:
    if name == "app":
        return _register(list(dict.fromkeys(COMMAND_MODULES.values())))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    module = COMMAND_MODULES.get(command or "")
    # prog_name: usage lines read `kidney-edge ...` under `python -m kidney_edge` too
    _register([module] if module else list(dict.fromkeys(COMMAND_MODULES.values())))(prog_name="kidney-edge")
