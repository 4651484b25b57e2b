"""Installed size of each extra: the disk an install for one role takes.

Method: resolve the requirement closure of the base install plus one extra from the installed
distributions' own metadata (``importlib.metadata``; markers evaluated for this interpreter),
then add up the sizes of the files each distribution's RECORD lists, as they lie in
site-packages on this machine (the same bytes ``du --apparent-size`` counts; bytecode caches
written after installation are not in RECORD and not counted). Nothing is downloaded.

    python benchmarks/bench_install_size.py    # writes benchmarks/results/install_size.{md,json}
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
from pathlib import Path
from typing import Any

import _harness as harness
import tomllib
from packaging.requirements import Requirement

REPO = harness.REPO
ROLES = {  # role -> extras of kidney-edge it installs
    "edge runtime only (base)": (),
    "train (training, evaluation, export)": ("train",),
    "serve (HTTP API and page)": ("serve",),
    "ray (predict --engine ray)": ("ray",),
    "dicom (DICOM input)": ("dicom",),
    "pacs (predict from a DICOMweb server, SR results)": ("pacs",),
    "dev (tests, linters)": ("dev",),
    "the demo (train + dicom)": ("train", "dicom"),
    "all (every extra: the test command)": ("all",),
}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project_requires() -> list[str]:
    """kidney-edge's requirements as this checkout's pyproject.toml declares them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        lines += [
            f"{line}; extra == '{extra}'" if ";" not in line else f"{line} and extra == '{extra}'"
            for line in requirements
        ]
    return lines


def closure(root: str, extras: tuple[str, ...]) -> set[str]:
    """Names of every installed distribution `root[extras]` pulls in, root excluded."""
    seen: set[str] = set()
    todo = [(root, frozenset(extras))]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in done:
            continue
        done.add((name, wanted))
        requires = _project_requires() if name == root else metadata.distribution(name).requires
        for line in requires or []:
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in wanted] or [{"extra": ""}]
            if requirement.marker and not any(requirement.marker.evaluate(env) for env in environments):
                continue
            child = _canonical(requirement.name)
            if child == _canonical(root):  # all = kidney-edge[train,...]
                todo.append((root, frozenset(requirement.extras)))
                continue
            seen.add(child)
            todo.append((child, frozenset(requirement.extras)))
    return seen


def installed_bytes(name: str) -> int:
    dist = metadata.distribution(name)
    total = 0
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        if path.is_file():
            total += path.stat().st_size
    return total


def measure() -> list[dict[str, Any]]:
    """One row per role: packages in its closure, installed MB, MB over the base, largest additions."""
    rows = []
    base = closure("kidney-edge", ())
    base_mb = sum(installed_bytes(name) for name in base) / 1e6
    for role, extras in ROLES.items():
        names = closure("kidney-edge", extras)
        sizes = {name: installed_bytes(name) for name in names}
        total_mb = sum(sizes.values()) / 1e6
        added = {name: size for name, size in sizes.items() if name not in base} or sizes
        largest = sorted(added.items(), key=lambda item: -item[1])[:3]
        rows.append(
            {
                "role": role,
                "extras": list(extras),
                "distributions": len(names),
                "total_mb": round(total_mb, 1),
                "over_base_mb": round(total_mb - base_mb, 1),
                "largest": [(name, round(size / 1e6, 1)) for name, size in largest],
            }
        )
    return rows


def render(record: dict[str, Any]) -> str:
    machine = record["machine"]
    lines = [
        "# Installed size per role",
        "",
        f"Recorded by `benchmarks/bench_install_size.py` ({record['started_utc']}, commit {record['commit']}). "
        f"Machine: {machine['platform']}, Python {machine['python']}; torch {record['versions']['torch']}, "
        f"ray {record['versions']['ray']}; the packages installed in `{record['site_packages']}`.",
        "",
        "Method: the requirement closure of `kidney-edge[EXTRA]` from the installed packages' "
        "metadata (markers evaluated for this interpreter), sizes summed over the files each "
        "package's RECORD lists (apparent size, as `du --apparent-size`; bytecode caches "
        "written later not counted). Sizes depend on the platform: torch's Linux wheels pull "
        "in the CUDA libraries, which is most of the `train` figure.",
        "",
        "| role | extras | packages | installed MB | MB over the base | largest packages it adds (base: its own largest), MB |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in record["roles"]:
        largest = ", ".join(f"{name} {size}" for name, size in row["largest"])
        extras = ",".join(row["extras"]) or "-"
        lines.append(
            f"| {row['role']} | {extras} | {row['distributions']} | {row['total_mb']} | "
            f"{row['over_base_mb']} | {largest} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    record = harness.start_record(
        versions={"torch": metadata.version("torch"), "ray": metadata.version("ray")},
        site_packages=str(Path(metadata.distribution("numpy").locate_file(""))),
    )
    record["roles"] = measure()
    harness.finish_record(record)
    markdown = render(record)
    harness.write_results(harness.RESULTS / "install_size", record, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
