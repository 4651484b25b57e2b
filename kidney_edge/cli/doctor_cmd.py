"""`kidney-edge doctor`: what this machine offers kidney-edge, without importing torch or Ray.

Optional packages are looked up in the installed distributions' metadata, never imported: the
doctor must run on an edge install (no torch), and importing torch or Ray only to print a
version costs seconds.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import metadata
from typing import Any

import typer

from kidney_edge.cli._app import PANEL_TOOLS, app, console

# Distributions whose versions the figures and the commands depend on, in the order printed.
PACKAGES = ("numpy", "pillow", "onnxruntime", "torch", "torchvision", "onnx", "pydicom", "ray",
            "fastapi", "uvicorn", "dicomweb-client", "highdicom", "typer", "rich")  # fmt: skip
# Programs on PATH that the tests use: the serve page's browser test drives the system chromium;
# the DICOMweb tests start Orthanc and validate stored SRs with dciodvfy.
PROGRAMS = ("chromium", "Orthanc", "dciodvfy")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def extras_installed() -> dict[str, bool]:
    """{extra: every distribution it requires is installed} from kidney-edge's own metadata
    (the ``all`` extra, which names the others, is left out)."""
    needs: dict[str, list[str]] = {}
    for requirement in metadata.requires("kidney-edge") or ():
        requirement_text, _, marker = requirement.partition(";")
        extra = _EXTRA_MARKER.search(marker)
        name = _REQUIREMENT_NAME.match(requirement_text)
        if extra and name and name.group(1) != "kidney-edge":
            needs.setdefault(extra.group(1), []).append(name.group(1))
    return {extra: all(_version(name) for name in names) for extra, names in needs.items()}


def environment() -> dict[str, Any]:
    """Versions, extras, CPU facts, threads, onnxruntime providers and helper programs."""
    import onnxruntime

    from kidney_edge import __version__
    from kidney_edge.runtime.benchmark import machine_info
    from kidney_edge.runtime.hardware import VNNI_FLAGS

    machine = machine_info()
    return {
        "kidney_edge": __version__,
        "python": machine["python"],
        "platform": machine["platform"],
        "packages": {name: _version(name) for name in PACKAGES},
        "extras": extras_installed(),
        "cpu": {
            "model": machine["cpu_model"],
            "isa_flags": machine["isa_flags"],
            "vnni": any(machine["isa_flags"].get(flag, False) for flag in VNNI_FLAGS),
        },
        "threads": {"usable": machine["cores_usable"], "host": machine["cores_host"]},
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "programs": {name: shutil.which(name) for name in PROGRAMS},
    }


def _render(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="kidney-edge doctor", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("found")
    table.add_row("kidney-edge", report["kidney_edge"])
    table.add_row("python", f"{report['python']} ({report['platform']})")
    for name, version in report["packages"].items():
        table.add_row(name, version or "[dim]not installed[/]")
    extras = report["extras"]
    table.add_row("extras installed", ", ".join(e for e, ok in extras.items() if ok) or "none")
    table.add_row("extras missing", ", ".join(e for e, ok in extras.items() if not ok) or "none")
    cpu = report["cpu"]
    flags = ", ".join(flag for flag, present in cpu["isa_flags"].items() if present) or "none found"
    table.add_row("CPU", cpu["model"])
    table.add_row("CPU features", f"{flags}; VNNI (fast INT8): {'yes' if cpu['vnni'] else 'no'}")
    threads = report["threads"]
    table.add_row("usable threads", f"{threads['usable']} (host CPUs: {threads['host']})")
    table.add_row("onnxruntime providers", ", ".join(report["onnxruntime_providers"]))
    for name, path in report["programs"].items():
        table.add_row(name, path or "[dim]not on PATH[/]")
    console.print(table)


@app.command(rich_help_panel=PANEL_TOOLS)
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """Check this machine: versions, extras installed, CPU features, threads, onnxruntime providers.

    Works on an edge install without PyTorch: optional packages (torch, pydicom, ray, ...) are
    looked up, not imported.
    """
    report = environment()
    if as_json:
        console.print_json(json.dumps(report))
        return
    _render(report)
