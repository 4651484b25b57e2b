"""`kidney-edge predict --engine ray` (Ray Data, local mode) against local `predict`, on one machine.

    python benchmarks/bench_ray.py --model /tmp/demo-record/export/model.onnx
    python benchmarks/bench_ray.py --render-only          # rewrite ray.md from ray.json

Measured in one run, on one machine:

1. Throughput. Both engines as whole processes (`python -m kidney_edge predict ...`) on the same
   2,000 phantom 512 px JPEGs at batch 8, in alternating rounds (the machine is shared): wall
   time with start-up, images/s, and images/s after the first row is on disk (start-up
   excluded: Ray's start, the actors' start and model load). The Ray engine runs its default
   pool (one single-thread actor per CPU); one more run uses 1 actor x 2 threads. The rows of
   the last round's two outputs are compared (labels, errors, probabilities). Then the same
   runs against a Ray cluster already running on this machine (``ray start --head``, then
   ``--address auto``): what a job pays when Ray itself is up, as on an existing cluster.
2. Memory on a large listing. Both engines as processes on 200,000 empty files: every row is an
   error row, so the run exercises the listing, the dataset, the actors and the writer, not the
   model. Peak RSS of the command's own process (the Ray driver; Ray's raylet, GCS and the
   actors are other processes), and the same for a 2,000-image run: the difference is what the
   listing costs the driver.
3. The driver's ceilings, in-process: rows/s the driver writes (CSV, JSONL, Parquet) and paths/s
   the listing scans, the two stages every file of a cluster run passes through on one machine.

ray.md adds the cluster reasoning, keeping apart what was measured here and what comes from
Ray's own published figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as harness

from kidney_edge.runtime import scan_images

RESULTS = harness.RESULTS / "ray"
BATCH_SIZE = 8
TARGET_RATIO = 0.7  # Ray local mode >= 0.7x local predict's images/s on the same machine
STARTUP_IMAGES = 16  # the start-up runs classify this many images


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("/tmp/demo-record/export/model.onnx"))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kidney-edge-bench-ray")
    parser.add_argument("--n", type=int, default=2000, help="images of the throughput runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--listing", type=int, default=200_000, help="empty files of the memory run (0: skip)"
    )
    parser.add_argument(
        "--attached-rounds", type=int, default=2, help="rounds against a running local cluster (0: skip)"
    )
    parser.add_argument(
        "--large", type=int, default=10_000, help="files of one larger job per engine (hard links; 0: skip)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render-only", action="store_true")
    return parser.parse_args()


# --------------------------------------------------------------------------- inputs


def empty_files(cache: Path, n: int) -> Path:
    """n empty ``.jpg`` files in folders of 1,000: a listing with no decoding behind it."""
    folder = cache / f"empty-{n}"
    if folder.is_dir() and sum(len(files) for _, _, files in os.walk(folder)) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for index in range(n):
        sub = folder / f"d{index // 1000:04d}"
        if index % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"slice-{index:07d}.jpg").touch()
    return folder


# --------------------------------------------------------------------------- measurements


def timed_predict(images: Path, model: Path, out: Path, *extra: str) -> dict[str, Any]:
    """`kidney-edge predict` as a whole process (:func:`harness.run_cli`): wall time, first row
    on disk, rows/s while running, peak memory of the command's own process, load."""
    run = harness.run_cli(
        ["predict", images, "--model", model, "--out", out, "--batch-size", BATCH_SIZE, "--no-series", *extra],
        out=out, env=harness.cli_env(RAY_USAGE_STATS_ENABLED="0"),
    )  # fmt: skip
    summary_line = next((line.strip() for line in run.output.splitlines() if " images in " in line), "")
    return {**run.to_dict(output_tail=600), "steady_images_per_s": run.steady_images_per_s(),
            "summary_line": summary_line}  # fmt: skip


def linked_subset(images: Path, n: int, cache: Path) -> Path:
    """The first n images of ``images`` as hard links in a folder of their own."""
    folder = cache / f"first-{n}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for path in scan_images(images)[:n]:
            os.link(path, folder / path.name)
    return folder


def compare_rows(local_csv: Path, ray_csv: Path) -> dict[str, Any]:
    """Same paths, labels and errors; the largest probability difference (CSV: 6 decimals)."""
    import csv

    def rows(path: Path) -> dict[str, dict[str, str]]:
        with open(path, newline="", encoding="utf-8") as handle:
            return {row["path"]: row for row in csv.DictReader(handle)}

    local, ray = rows(local_csv), rows(ray_csv)
    scores = [c for c in next(iter(local.values())) if c.startswith("p_") or c in ("confidence", "ood_score")]
    same_paths = set(local) == set(ray)
    differing = [
        p
        for p in local
        if p in ray and any(local[p][c] != ray[p][c] for c in ("label", "argmax_label", "error"))
    ]
    deltas = [
        abs(float(local[p][c]) - float(ray[p][c]))
        for p in local
        if p in ray
        for c in scores
        if local[p][c] and ray[p][c]
    ]
    return {"rows": len(local), "same_paths": same_paths, "label_or_error_differences": len(differing),
            "max_abs_score_difference": max(deltas, default=0.0)}  # fmt: skip


def writer_ceilings(sample_csv: Path, rows: int, scratch: Path) -> dict[str, float]:
    """Rows/s of the driver's writers on ``rows`` copies of real predictions rows (in-process)."""
    import csv

    from kidney_edge.runtime.driver import TextWriter
    from kidney_edge.runtime.ray_engine import _ParquetWriter
    from kidney_edge.runtime.rows import OutputFormat

    with open(sample_csv, newline="", encoding="utf-8") as handle:
        sample = list(csv.DictReader(handle))
    columns = list(sample[0])
    typed = [{c: (float(v) if v and (c.startswith("p_") or c in ("confidence", "ood_score")) else (v or None))
              for c, v in row.items()} for row in sample]  # fmt: skip
    batches = [typed[i : i + BATCH_SIZE] for i in range(0, len(typed), BATCH_SIZE)]
    import pyarrow as pa

    schema = pa.Table.from_pylist(typed).schema
    schema = pa.schema(
        [pa.field(f.name, pa.float64() if pa.types.is_null(f.type) else f.type) for f in schema]
    )
    result = {}
    for name, make in (
        ("csv", lambda: TextWriter(scratch / "w.csv", OutputFormat.CSV, columns, False)),
        ("jsonl", lambda: TextWriter(scratch / "w.jsonl", OutputFormat.JSONL, columns, False)),
        ("parquet", lambda: _ParquetWriter(scratch / "w.parquet", schema, False)),
    ):
        writer, written = make(), 0
        start = time.perf_counter()
        while written < rows:
            for batch in batches:
                writer.write(batch)
                written += len(batch)
        writer.close()
        result[f"{name}_rows_per_s"] = round(written / (time.perf_counter() - start))
    return result


def listing_rate(folder: Path) -> dict[str, float]:
    from kidney_edge.runtime.ray_engine import list_source

    start = time.perf_counter()
    paths = list_source(str(folder))
    seconds = time.perf_counter() - start
    return {"paths": len(paths), "seconds": round(seconds, 2), "paths_per_s": round(len(paths) / seconds)}


def attached_rounds(
    images: Path, few: Path, model: Path, scratch: Path, rounds: int, large: Path | None
) -> dict[str, Any]:
    """Start-up and 2,000-image runs with ``--address auto`` against a head node started here
    (and stopped after): the per-job cost once Ray itself is running; then the ``large`` job."""
    from kidney_edge.runtime import available_cpus

    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    subprocess.run([*ray_cli, "start", "--head", f"--num-cpus={available_cpus()}", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env)  # fmt: skip
    record: dict[str, Any] = {
        "cluster_start_s": round(time.perf_counter() - start, 2),
        "startup": [],
        "rounds": [],
    }
    try:
        for _ in range(rounds):
            extra = ("--engine", "ray", "--address", "auto")
            record["startup"].append(timed_predict(few, model, scratch / "few-attached.csv", *extra))
            record["rounds"].append(timed_predict(images, model, scratch / "attached.csv", *extra))
            print(f"attached: {record['rounds'][-1]['images_per_s']} img/s", flush=True)
        if large is not None:
            record["large"] = timed_predict(large, model, scratch / "large-attached.csv", *extra)
    finally:
        subprocess.run([*ray_cli, "stop", "--force"], capture_output=True, env=env)
    return record


def measure(args: argparse.Namespace) -> dict[str, Any]:
    args.cache.mkdir(parents=True, exist_ok=True)
    images = harness.phantom_images(args.cache, args.n)
    harness.warm_disk_cache(images)
    few = linked_subset(images, STARTUP_IMAGES, args.cache)
    scratch = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    record = harness.start_record(model=str(args.model), images=args.n, batch_size=BATCH_SIZE, rounds=[],
                                  startup={"local": [], "ray": []})  # fmt: skip
    try:
        for index in range(args.rounds):
            for engine, extra in (("local", ()), ("ray", ("--engine", "ray"))):
                record["startup"][engine].append(timed_predict(few, args.model, scratch / "few.csv", *extra))
            local = timed_predict(images, args.model, scratch / "local.csv")
            ray = timed_predict(images, args.model, scratch / "ray.csv", "--engine", "ray")
            record["rounds"].append({"local": local, "ray": ray})
            print(
                f"round {index + 1}: local {local['images_per_s']} img/s, ray {ray['images_per_s']} img/s",
                flush=True,
            )
        record["rows_compared"] = compare_rows(scratch / "local.csv", scratch / "ray.csv")
        record["ray_1x2"] = timed_predict(images, args.model, scratch / "ray12.csv", "--engine", "ray",
                                          "--actors", "1", "--threads", "2")  # fmt: skip
        large = harness.linked_folder(images, args.large, args.cache) if args.large else None
        if large is not None:
            record["large"] = {
                "local": timed_predict(large, args.model, scratch / "large-local.csv"),
                "ray": timed_predict(large, args.model, scratch / "large-ray.csv", "--engine", "ray"),
            }
        if args.attached_rounds:
            record["attached"] = attached_rounds(
                images, few, args.model, scratch, args.attached_rounds, large
            )
        record["writers"] = writer_ceilings(scratch / "local.csv", 200_000, scratch)
        if args.listing:
            empty = empty_files(args.cache, args.listing)
            record["listing"] = listing_rate(empty)
            record["memory"] = {
                "files": args.listing,
                "local": timed_predict(empty, args.model, scratch / "empty-local.csv"),
                "ray": timed_predict(empty, args.model, scratch / "empty-ray.csv", "--engine", "ray"),
            }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return harness.finish_record(record)


# --------------------------------------------------------------------------- rendering


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return round(ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2, 2)


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"target_ratio": TARGET_RATIO}
    for engine in ("local", "ray"):
        runs = [r[engine] for r in record["rounds"]]
        summary[engine] = {
            "images_per_s": _median([run["images_per_s"] for run in runs]),
            "steady_images_per_s": _median([run["steady_images_per_s"] for run in runs]),
            "startup_s": _median([run["wall_s"] for run in record["startup"][engine]]),
        }
    for key in ("images_per_s", "steady_images_per_s"):
        summary[f"ratio_{key}"] = round(summary["ray"][key] / summary["local"][key], 3)
    attached = record.get("attached")
    if attached:
        summary["attached"] = {
            "images_per_s": _median([run["images_per_s"] for run in attached["rounds"]]),
            "steady_images_per_s": _median([run["steady_images_per_s"] for run in attached["rounds"]]),
            "startup_s": _median([run["wall_s"] for run in attached["startup"]]),
        }
        summary["ratio_attached_images_per_s"] = round(
            summary["attached"]["images_per_s"] / summary["local"]["images_per_s"], 3
        )
    large = record.get("large")
    if large:
        local_rate = large["local"]["images_per_s"]
        summary["large"] = {"files": large["local"]["rows"],
                            "ratio_ray": round(large["ray"]["images_per_s"] / local_rate, 3)}  # fmt: skip
        attached_large = (attached or {}).get("large")
        if attached_large:
            summary["large"]["ratio_attached"] = round(attached_large["images_per_s"] / local_rate, 3)
    return summary


def _load(run: dict[str, Any]) -> str:
    """1-minute load before/after a run (older records: load_1m_before_after)."""
    if "load_1m_before_after" in run:
        return "/".join(str(value) for value in run["load_1m_before_after"])
    return f"{run['load_average_before'][0]}/{run['load_average_after'][0]}"


def _large_words(record: dict[str, Any]) -> str:
    large = record["summary"].get("large")
    if not large:
        return ""
    attached = f", {large['ratio_attached']}x on the running cluster" if "ratio_attached" in large else ""
    return (
        f"The start-up is paid once per job, so the end-to-end ratio grows with the job: on "
        f"{large['files']:,} files (hard links over the same images) Ray ran at {large['ratio_ray']}x local "
        f"end to end with its own start{attached}. "
    )


def _attached_words(record: dict[str, Any]) -> str:
    s = record["summary"]
    if "attached" not in s:
        return "With `--address` to a running cluster there is no Ray start to pay. " + _large_words(record)
    attached = s["attached"]
    return (
        f"Against a Ray cluster already running on this machine (`ray start --head`, "
        f"{record['attached']['cluster_start_s']} s once, then `--address auto`) a job pays no Ray start: "
        f"the {STARTUP_IMAGES}-image runs took {attached['startup_s']} s (connecting, starting the actors "
        f"and loading the model), and the 2,000-image runs reached {attached['images_per_s']} images/s end "
        f"to end: **{s['ratio_attached_images_per_s']}x local**. " + _large_words(record)
    )


def render(record: dict[str, Any]) -> str:
    s, machine = record["summary"], record["machine"]
    lines = [
        "# Ray Data engine (`predict --engine ray`) against local `predict`",
        "",
        "Written by `benchmarks/bench_ray.py` (the method is in its docstring). Machine: "
        f"{machine['cpu_model']}, {machine['cores_usable']} usable cores, onnxruntime {machine['onnxruntime']}, "
        f"Python {machine['python']}; commit {record['commit']}; model `{record['model']}` (fp32, "
        f"EfficientNet-Lite0 at 160 px); {record['images']} phantom 512 px JPEGs, batch "
        f"{record['batch_size']}, warm disk cache. The machine is shared with other jobs: the 1-minute "
        "load average before and after each run is in the tables.",
        "",
        "## 1. Throughput on this machine (measured)",
        "",
        "| round | engine | images | wall s | images/s end to end | first row s | images/s running (10-90% of rows) | peak private MB | load before/after |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    runs = []
    for index, round_ in enumerate(record["rounds"]):
        for engine in ("local", "ray"):
            runs.append((f"{index + 1}", f"{engine}, start-up only", record["startup"][engine][index]))
            runs.append((f"{index + 1}", engine, round_[engine]))
    runs.append(("-", "ray, 1 actor x 2 threads", record["ray_1x2"]))
    for engine, run in (record.get("large") or {}).items():
        runs.append(("-", f"{engine}, larger job", run))
    if (record.get("attached") or {}).get("large"):
        runs.append(("-", "ray on a running cluster, larger job", record["attached"]["large"]))
    attached = record.get("attached")
    for index, run in enumerate((attached or {}).get("rounds", [])):
        runs.append((f"{index + 1}", "ray on a running cluster, start-up only", attached["startup"][index]))
        runs.append((f"{index + 1}", "ray on a running cluster (`--address auto`)", run))
    for round_, name, run in runs:
        lines.append(
            f"| {round_} | {name} | {run['rows']} | {run['wall_s']} | {run['images_per_s']} | "
            f"{run['first_row_s']} | {run['steady_images_per_s'] or '-'} | {run['peak_private_mb']} | {_load(run)} |"
        )
    local, ray, compared = s["local"], s["ray"], record["rows_compared"]
    lines += [
        "",
        f"Medians over the {len(record['rounds'])} rounds. **Running throughput** (rows on disk between 10% "
        f"and 90% of the job): local {local['steady_images_per_s']}, Ray {ray['steady_images_per_s']} "
        f"images/s: **Ray = {s['ratio_steady_images_per_s']}x local** (target >= {s['target_ratio']}x). "
        f"**End to end**, start-up included: local {local['images_per_s']}, Ray {ray['images_per_s']} "
        f"images/s: {s['ratio_images_per_s']}x. The difference is start-up, paid once per job: the "
        f"{STARTUP_IMAGES}-image runs took {local['startup_s']} s locally and {ray['startup_s']} s with "
        "Ray (starting Ray's own processes: GCS, raylet, dashboard and runtime-env agents, log monitor, "
        "prestarted workers; then the actors, each importing onnxruntime and loading the model; then "
        "shutting Ray down). "
        + _attached_words(record)
        + f"The 1 actor x 2 threads run (one two-thread onnxruntime session) ran at "
        f"{record['ray_1x2']['steady_images_per_s']} images/s once running: local predict and the Ray "
        "pool both run one single-thread session per core by default, because that layout beats one "
        "session split across the cores.",
        "",
        f"Rows of the last round: {compared['rows']} rows, same paths: {compared['same_paths']}, labels or "
        f"errors differing: {compared['label_or_error_differences']}, largest probability difference in the "
        f"CSVs: {compared['max_abs_score_difference']}.",
        "",
        "Commands (as run, from the repository root):",
        "",
        "```",
        record["rounds"][-1]["local"]["command"],
        record["rounds"][-1]["ray"]["command"],
        "```",
    ]
    if "memory" in record:
        memory = record["memory"]
        base = _median([r["ray"]["peak_private_mb"] for r in record["rounds"]])
        extra = memory["ray"]["peak_private_mb"] - base
        lines += [
            "",
            f"## 2. Driver memory on a {memory['files']:,}-path listing (measured)",
            "",
            f"{memory['files']:,} empty `.jpg` files in folders of 1,000; every row is an error row "
            "(`file is empty`), so the run measures listing, dataset, actors and writer, not the model "
            "(its rows/s is the engine's own overhead per batch and block with nothing to hide it, not "
            "broken down further here). "
            "Memory of the command's own process (the Ray driver); private = RssAnon, object store = "
            "its mapped share of Ray's shared-memory object store (RssShmem), both sampled every 20 ms.",
            "",
            "| engine | wall s | rows | peak private MB | peak object store MB | peak RSS MB | load before/after |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for name in ("local", "ray"):
            run = memory[name]
            lines.append(
                f"| {name} | {run['wall_s']} | {run['rows']} | {run['peak_private_mb']} | "
                f"{harness.recorded(run, 'peak_shared_mb')} | {run['peak_rss_mb']} | {_load(run)} |"
            )
        lines += [
            "",
            f"The Ray driver's private memory peaked at {memory['ray']['peak_private_mb']} MB, against "
            f"{base} MB in the {record['images']}-image runs: the {memory['files']:,}-path listing cost "
            f"it {extra:.0f} MB, {extra * 2**20 / memory['files']:.0f} bytes a path: each path once (a "
            "Python str in the to-do list) plus Ray Data's per-block bookkeeping for the input blocks "
            "(2,048 paths a block here). Rows never accumulate: each output block is written and "
            "dropped. At this slope 1M paths would cost the driver about "
            f"{extra * 1e6 / memory['files']:.0f} MB over its base (reasoned from the slope, not measured).",
        ]
    listing, writers = record.get("listing"), record["writers"]
    lines += ["", "## 3. The driver's ceilings (measured, in-process)", ""]
    if listing:
        lines.append(
            f"- Listing a local folder (predict's own scan): {listing['paths']:,} paths in "
            f"{listing['seconds']} s = {listing['paths_per_s']:,} paths/s."
        )
    lines.append(
        f"- Writing rows (200,000 real rows from this run, batch {record['batch_size']}): CSV "
        f"{writers['csv_rows_per_s']:,} rows/s, JSONL {writers['jsonl_rows_per_s']:,} rows/s, Parquet "
        f"{writers['parquet_rows_per_s']:,} rows/s."
    )
    per_core = ray["steady_images_per_s"] / machine["cores_usable"]
    lines += [
        "",
        "## 4. A cluster of N nodes (reasoned, not measured here)",
        "",
        f"From this run: one single-thread actor classifies about {per_core:.0f} images/s (Ray's running "
        "rate per core, on this loaded 2-core box; an idle modern core does more). Every "
        f"row passes through the driver, which writes {writers['csv_rows_per_s']:,} CSV rows/s on one "
        f"core, so throughput grows with cores until about {writers['csv_rows_per_s'] / per_core:,.0f} "
        f"busy actor cores (Parquet: {writers['parquet_rows_per_s'] / per_core:,.0f}); past that the "
        "driver's writer is the limit, and the next step would be actors writing Parquet themselves. "
        "The listing is the other serial stage: it runs once, before the first task, at the rate above "
        "for a local folder (a network filesystem answers more slowly per entry).",
        "",
        "From Ray's published figures (not measured here):",
        "",
        "- Ray's scalability envelope (`release/benchmarks/README.md` in ray-project/ray) reports "
        "clusters of 3k+ nodes and 20k+ actors with trivial work, and 15k+ simultaneously running tasks "
        "(64 nodes x 64 cores): one actor per core stays inside it up to a few hundred 64-core nodes.",
        "- Ray AIR's batch-prediction benchmark (Ray 2.0 docs, XGBoost, m5.4xlarge nodes) went from "
        "94.5k rows/s on 1 node to 786k rows/s on 10 nodes (8.3x): near-linear while the per-row work "
        "dominates, and a CNN forward pass of several ms per image is far more work per row than XGBoost.",
        "- Object-store listings: S3's ListObjectsV2 returns at most 1,000 keys per request, so listing "
        "1M objects is 1,000 sequential requests before the first task.",
        "",
        "So, for N nodes of C cores: about N x C x (per-core rate) images/s, until the driver's writer "
        "(the figure above) or the storage's read bandwidth stops it; each actor holds one onnxruntime "
        "session, and the start-up (Ray, actors, listing) is paid once per job.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.render_only:
        record = harness.read_results(args.out)
        harness.write_markdown(args.out, render(record))
    else:
        record = measure(args)
        record["summary"] = summarize(record)
        harness.write_results(args.out, record, render(record))
    print(render(record))


if __name__ == "__main__":
    main()
