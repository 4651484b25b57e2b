"""``predict dicomweb+http://…`` against local ``predict`` on the same files: studies/min end to end, equal rows.

    python benchmarks/bench_pacs.py --model /tmp/pacs-export          # 40 phantom studies
    python benchmarks/bench_pacs.py --render-only                     # rewrite pacs.md from pacs.json

1. ``synthesize_series`` writes ``--n`` phantom CT studies (one series each, the defaults of
   ``synth --format dicom``: 512 px, 24-40 slices of 5 mm, the gap / duplicate /
   mixed-orientation quirk series included) into a folder;
2. Orthanc with its DICOMweb plugin starts on a free loopback port with a temporary storage
   folder (tests/_orthanc.py, the tests' own launcher) and the files are uploaded with STOW-RS;
3. whole-process runs, each timed from outside (harness.run_cli): ``predict FOLDER``;
   ``predict dicomweb+http://… --since 2000-01-01``; the same with ``--store`` (one SR per
   classified series, STOW-RS); and ``--store`` again (every SR already there: nothing stored);
4. rows are compared by SOPInstanceUID (slices) and SeriesInstanceUID (series): labels equal,
   the largest probability difference, and which series columns differ (a PACS keeps one copy of
   an instance sent twice, so the duplicate-quirk series counts one file fewer there).

Studies/min = studies / wall seconds x 60, start-up included. Run it alone: it is CPU-heavy.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import _harness as harness

sys.path.insert(0, str(harness.REPO / "tests"))  # the tests' Orthanc launcher: one owner
import _orthanc  # noqa: E402

from kidney_edge.phantoms.dicom_series import SeriesPhantomConfig, synthesize_series  # noqa: E402
from kidney_edge.runtime.predict import scan_image_paths  # noqa: E402
from kidney_edge.spec import DEFAULT_CLASS_NAMES  # noqa: E402

RESULTS = harness.RESULTS / "pacs"
PROBABILITIES = [f"p_{name}" for name in DEFAULT_CLASS_NAMES]
SERIES_COLUMNS = ("label", "n_files", "n_slices", "n_left_out", "peak_instance", "warning", "error")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/pacs-export", help="export folder or .onnx file")
    parser.add_argument("--n", type=int, default=40, help="phantom studies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=SeriesPhantomConfig.size, help="slice size, px")
    parser.add_argument("--work", default="/tmp/bench-pacs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="OUT.json and OUT.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite OUT.md from OUT.json")
    return parser.parse_args()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _sop(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _largest_difference(a: dict[str, str], b: dict[str, str]) -> float:
    if not a["label"] and not b["label"]:
        return 0.0
    return max(abs(float(a[c]) - float(b[c])) for c in PROBABILITIES)


def compare(folder_csv: Path, web_csv: Path) -> dict[str, Any]:
    """Slice rows by SOPInstanceUID and series rows by SeriesInstanceUID, folder against dicomweb."""
    folder = {_sop(row["path"]): row for row in _rows(folder_csv)}
    web = {_sop(row["path"]): row for row in _rows(web_csv)}
    shared = sorted(set(folder) & set(web))
    folder_series = {
        row["series_uid"]: row for row in _rows(folder_csv.with_name(folder_csv.stem + ".series.csv"))
    }
    web_series = {row["series_uid"]: row for row in _rows(web_csv.with_name(web_csv.stem + ".series.csv"))}
    differing = {
        uid: [c for c in SERIES_COLUMNS if row[c] != folder_series[uid][c]]
        for uid, row in web_series.items()
        if uid in folder_series
    }
    return {
        "slices_folder": len(folder), "slices_dicomweb": len(web), "slices_shared": len(shared),
        "slice_labels_equal": sum(folder[s]["label"] == web[s]["label"] for s in shared),
        "slice_max_probability_difference": max(_largest_difference(folder[s], web[s]) for s in shared),
        "series_folder": len(folder_series), "series_dicomweb": len(web_series),
        "series_labels_equal": sum(folder_series[u]["label"] == r["label"] for u, r in web_series.items()),
        "series_max_probability_difference": max(
            _largest_difference(folder_series[u], r) for u, r in web_series.items()),
        "series_columns_differing": {uid: cols for uid, cols in differing.items() if cols},
    }  # fmt: skip


def _run(name: str, args: list[str], out: Path, studies: int) -> dict[str, Any]:
    harness.log(f"{name}: kidney-edge {' '.join(map(str, args))}")
    run = harness.run_cli(args, out=out)
    facts = run.to_dict()
    facts.update(name=name, studies=studies, studies_per_min=round(studies / run.wall_s * 60, 1))
    stored = [line for line in run.output.splitlines() if line.startswith("SRs stored")]
    facts["store_line"] = stored[-1] if stored else ""
    facts["printed"] = run.output  # what the command printed: docs/pacs.md quotes it
    harness.log(f"{name}: exit {run.exit_code}, {run.wall_s:.1f} s, {facts['studies_per_min']} studies/min")
    return facts


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    data = work / "studies"
    harness.log(f"synthesizing {args.n} phantom studies in {data}")
    summary = synthesize_series(data, SeriesPhantomConfig(n_series=args.n, seed=args.seed, size=args.size))
    record = harness.start_record(model=args.model, studies=summary.n_series, files=summary.n_files, size=args.size,
                                  quirks=summary.quirks, runs=[])  # fmt: skip
    # --no-ood: the look-alike model's detector rejects every classic-phantom slice as unknown (they
    # are outside what it learned), which leaves no series label and nothing to store.
    model = ["--model", args.model, "--no-ood"]
    shutil.rmtree(work / "orthanc", ignore_errors=True)  # an empty PACS: no SR of an earlier run
    with _orthanc.running_orthanc(work / "orthanc") as server:
        harness.log(f"uploading {summary.n_files} files to Orthanc at {server.http_url}")
        _orthanc.upload(server, scan_image_paths(data))
        record["orthanc"] = server.get_json("/system")["Version"]
        record["retrieve"] = retrieve_costs(server)
        web = [server.source, "--since", "2000-01-01", *model]
        plan = [
            ("predict FOLDER", ["predict", str(data), *model, "--out", work / "folder.csv"], work / "folder.csv"),
            ("predict dicomweb", ["predict", *web, "--out", work / "web.csv"], work / "web.csv"),
            ("predict dicomweb --store", ["predict", *web, "--out", work / "store.csv", "--store"], work / "store.csv"),
            ("predict dicomweb --store, again", ["predict", *web, "--out", work / "again.csv", "--store"],
             work / "again.csv"),
        ]  # fmt: skip
        for name, cli_args, out in plan:
            record["runs"].append(_run(name, cli_args, out, summary.n_series))
        sr_series = _stored_sr_count(server)
    record["stored_srs_on_server"] = sr_series
    record["equality"] = compare(work / "folder.csv", work / "web.csv")
    record["equality_store"] = compare(work / "folder.csv", work / "store.csv")
    return harness.finish_record(record)


def retrieve_costs(server: _orthanc.Orthanc, n_instances: int = 40, n_series: int = 4) -> dict[str, Any]:
    """ms per instance of WADO-RS retrieves one instance at a time and one series at a time."""
    from kidney_edge.runtime.dicomweb import DicomwebSource, Selection

    source = DicomwebSource(server.source)
    instances = list(source.list(Selection(since="2000-01-01")).instances.values())
    started = time.perf_counter()
    for instance in instances[:n_instances]:
        source.retrieve(instance)
    per_instance = (time.perf_counter() - started) / n_instances * 1000
    series = list(dict.fromkeys((i.study_uid, i.series_uid) for i in instances))[:n_series]
    started, count = time.perf_counter(), 0
    for study_uid, series_uid in series:
        count += len(source.retrieve_series(study_uid, series_uid))
    per_series_instance = (time.perf_counter() - started) / count * 1000
    return {"instances": n_instances, "ms_per_instance_alone": round(per_instance, 1),
            "series": n_series, "series_instances": count,
            "ms_per_instance_in_a_series": round(per_series_instance, 1)}  # fmt: skip


def _stored_sr_count(server: _orthanc.Orthanc) -> int:
    """SR instances on the server (QIDO-RS over every study)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(server.dicomweb)
    return len(client.search_for_instances(search_filters={"Modality": "SR"}))


def render(record: dict[str, Any]) -> str:
    machine = record["machine"]
    lines = [
        "# `predict dicomweb+http://…` against local `predict` on the same files",
        "",
        f"Written by `benchmarks/bench_pacs.py` (the method is in its docstring). Machine: "
        f"{harness.cpu_kind(machine)}, onnxruntime {machine['onnxruntime']}, Python {machine['python']}; "
        f"commit {record['commit']}; model `{record['model']}`; Orthanc {record.get('orthanc', '?')} with its "
        f"DICOMweb plugin on 127.0.0.1; {record['studies']} phantom CT studies, {record['files']} files "
        f"({record['size']} px, 24-40 slices each). The machine is shared with other jobs: the 1-minute load average before "
        f"and after each run is in the table.",
        "",
        "## Studies per minute, end to end (measured)",
        "",
        "| run | studies | instances | wall s | studies/min | images/s | first row s | exit | SRs | load before/after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for run in record["runs"]:
        load = f"{run['load_average_before'][0]}/{run['load_average_after'][0]}"
        lines.append(
            f"| {run['name']} | {run['studies']} | {run['rows']} | {run['wall_s']:.1f} | {run['studies_per_min']} | "
            f"{run['images_per_s']} | {run['first_row_s']} | {run['exit_code']} | "
            f"{run['store_line'].removeprefix('SRs ') or '-'} | {load} |"
        )
    lines += ["", f"SR instances on the server after the four runs: {record['stored_srs_on_server']}.", ""]
    cost = record.get("retrieve")
    if cost:
        lines += [
            "## WADO-RS retrieve: one instance at a time or a series at a time",
            "",
            f"Orthanc answered {cost['instances']} retrieves of one instance in {cost['ms_per_instance_alone']} ms "
            f"per instance, and {cost['series']} retrieves of a whole series ({cost['series_instances']} "
            f"instances) in {cost['ms_per_instance_in_a_series']} ms per instance: `predict` retrieves a "
            "series at a time.",
            "",
        ]
    lines += _render_equality(record)
    return "\n".join(lines) + "\n"


def _render_equality(record: dict[str, Any]) -> list[str]:
    same = record["equality"]
    lines = [
        "## Equal rows",
        "",
        f"- slices: {same['slices_dicomweb']} dicomweb rows, {same['slices_folder']} folder rows, "
        f"{same['slices_shared']} SOP instances in both; labels equal on {same['slice_labels_equal']}; "
        f"largest probability difference {same['slice_max_probability_difference']:.1e}",
        f"- series: {same['series_dicomweb']} dicomweb rows, {same['series_folder']} folder rows; labels equal "
        f"on {same['series_labels_equal']}; largest score difference {same['series_max_probability_difference']:.1e}",
    ]
    for uid, columns in same["series_columns_differing"].items():
        lines.append(f"- series {uid}: {', '.join(columns)} differ")
    if same["series_columns_differing"]:
        lines.append(
            "  (the phantom's duplicate quirk writes one instance twice; a PACS keeps one copy of a SOP "
            "instance, so that series has one file fewer there and no duplicate warning)"
        )
    store = record["equality_store"]
    lines.append(f"- the `--store` run's rows: labels equal on {store['slice_labels_equal']} slices and "
                 f"{store['series_labels_equal']} series")  # fmt: skip
    return lines


def main() -> None:
    args = parse_args()
    if args.render_only:
        record = harness.read_results(args.out)
    else:
        record = run(args)
    harness.write_results(args.out, record, render(record))
    print(render(record))


if __name__ == "__main__":
    main()
