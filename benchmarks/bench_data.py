"""Data benchmarks: phantom generator speed, and scan + split time and grouping quality.

    python benchmarks/bench_data.py                      # both (generator: 2,000 at 512 px; split: 818)
    python benchmarks/bench_data.py --only generator --renderer lookalike
    nice python benchmarks/bench_data.py --only split --renderer classic --split-n 407

``--renderer`` picks the phantom (``kidney-edge synth --style``): ``classic`` or ``lookalike``,
an independent renderer whose patients are drawn from a few shared body types. The split
records how far single linkage over near-duplicate and series links over-merges (largest
group, phantom patients per group) with and without the group cuts, measured against the
renderer's ``phantom_truth.csv``, which the split itself never reads.

Writes benchmarks/results/data.json and data.md (merging with what is there; one record per
renderer and size). Wall time on a shared machine depends on the load, so the CPU time of this
process, the load average and the CPU model are recorded next to it. Single-threaded: BLAS
threads are pinned to 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# Single-threaded figures: set before numpy (imported by the harness's kidney_edge) starts BLAS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import _harness as harness  # noqa: E402
import numpy as np  # noqa: E402

from kidney_edge import dataset  # noqa: E402
from kidney_edge.dataset import grouping  # noqa: E402
from kidney_edge.phantoms.styles import PhantomStyle, synthesizer  # noqa: E402

RESULTS = harness.RESULTS
# make_splits options that leave plain single linkage: no group is ever cut.
UNCUT = {"max_group_share": None, "proportion_tolerance": 1.0, "min_eval_images": 0}


class Timer:
    def __enter__(self) -> Timer:
        self.load_before = harness.load_average()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        self.load_after = harness.load_average()

    def record(self, n: int) -> dict[str, object]:
        return {
            "wall_s": round(self.wall, 2),
            "cpu_s": round(self.cpu, 2),
            "images_per_s_wall": round(n / self.wall, 1),
            "images_per_s_cpu": round(n / self.cpu, 1),
            "load_average_before": self.load_before,
            "load_average_after": self.load_after,
        }


def bench_generator(renderer: str, n: int, size: int, workdir: Path) -> dict[str, object]:
    with Timer() as timer:
        summary = synthesizer(renderer)(workdir / f"gen-{renderer}", n=n, size=size, seed=0)
    return {
        "renderer": renderer,
        "n": n,
        "size": size,
        "patients": summary.n_patients,
        **timer.record(n),
        "target": "< 30 s on one core",
    }


def _truth(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "phantom_truth.csv", newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def _patients(scan: dataset.DatasetScan, truth: dict) -> list[str]:
    """The phantom patient of every scanned image, in scan order (measurement only)."""
    return [truth[item.path.relative_to(scan.root).as_posix()]["patient"] for item in scan.items]


def over_merge(result: dataset.SplitResult, patients: list[str]) -> dict[str, object]:
    """How well the content-only groups recover the phantom patients, and what the split made of them."""
    groups_of, splits_of, patients_in = defaultdict(set), defaultdict(set), defaultdict(set)
    group_sizes: dict[str, int] = defaultdict(int)
    for patient, row in zip(patients, result.rows, strict=True):
        groups_of[patient].add(row.group)
        splits_of[patient].add(row.split)
        patients_in[row.group].add(patient)
        group_sizes[row.group] += 1
    largest = max(group_sizes, key=group_sizes.__getitem__)
    audit = result.audit
    return {
        "largest_group": group_sizes[largest],
        "largest_group_share": round(group_sizes[largest] / len(result.rows), 4),
        "patients_in_largest_group": len(patients_in[largest]),
        "most_patients_in_one_group": max(len(p) for p in patients_in.values()),
        "groups_joining_several_patients": sum(len(p) > 1 for p in patients_in.values()),
        "patients": len(groups_of),
        "patients_in_several_groups": sum(len(g) > 1 for g in groups_of.values()),
        "patients_crossing_splits": sum(len(s) > 1 for s in splits_of.values()),
        "max_proportion_error": audit["max_proportion_error"],
        "fewest_val_test_images_of_a_class": min(
            audit["counts"][s][c] for s in ("val", "test") for c in audit["class_names"]
        ),
        "links_cut": audit["group_cuts"]["links_cut"],
    }


def distance_profile(scan: dataset.DatasetScan, patients: list[str], sample: int = 3000) -> dict[str, object]:
    """Perceptual-hash distances within and between phantom patients on a sample (sets the default)."""
    rng = np.random.default_rng(0)
    pick = rng.choice(len(scan.items), size=min(sample, len(scan.items)), replace=False)
    items = [scan.items[i] for i in pick]
    patient = np.array(patients)[pick]
    words = np.frombuffer(b"".join(i.phash for i in items), np.uint64).reshape(len(items), -1)
    same_all, other_all = [], []
    for start in range(0, len(items), 256):
        d = np.bitwise_count(words[start : start + 256, None] ^ words[None]).sum(-1)  # (b, N)
        rows = np.arange(start, start + len(d))[:, None]
        cols = np.arange(len(items))[None, :]
        upper = cols > rows
        same = patient[rows] == patient[cols]
        same_all.append(d[upper & same])
        other_all.append(d[upper & ~same])
    same_d, other_d = np.concatenate(same_all), np.concatenate(other_all)
    return {
        "sample_images": len(items),
        "same_patient_bits_p50_p99_max": [float(np.percentile(same_d, p)) for p in (50, 99, 100)],
        "other_patients_bits_min_p0.001_p0.01_p1": [
            float(np.percentile(other_d, p)) for p in (0, 0.001, 0.01, 1)
        ],
        "other_patient_pairs": int(len(other_d)),
        "other_pairs_within_default": int((other_d <= dataset.DEFAULT_NEAR_DUP_DISTANCE).sum()),
    }


def series_profile(scan: dataset.DatasetScan, patients: list[str]) -> dict[str, object]:
    """Series links (neighbouring file numbers that look alike) within and between phantom
    patients, as distance over the series threshold: the evidence for which ones the split may cut."""
    links = grouping.series_pairs(scan, dataset.DEFAULT_SERIES_DISTANCE)
    patient = np.array(patients)
    same = patient[links.pairs[:, 0]] == patient[links.pairs[:, 1]]

    def percentiles(values: np.ndarray, points: tuple[float, ...]) -> list[float] | None:
        return [round(float(np.percentile(values, p)), 3) for p in points] if len(values) else None

    return {
        "same_patient_links": int(same.sum()),
        "same_patient_p50_p99_max": percentiles(links.distance[same], (50, 99, 100)),
        "between_patient_links": int((~same).sum()),
        "between_patient_min_p1_p50": percentiles(links.distance[~same], (0, 1, 50)),
    }


def bench_split(renderer: str, n: int, size: int, workdir: Path) -> dict[str, object]:
    data = workdir / f"split-{renderer}-{n}"
    reuse = (data / "phantom_truth.csv").is_file() and len(_truth(data)) == n
    with Timer() as gen_timer:
        if reuse:  # the recorded generation time of the earlier run is kept
            print(f"reusing the phantom in {data}; generation not timed", file=sys.stderr)
        else:
            synthesizer(renderer)(data, n=n, size=size, seed=1)
    with Timer() as scan_timer:
        scan = dataset.scan_dataset(data)
    with Timer() as split_timer:
        result = dataset.make_splits(scan, seed=0)
    patients = _patients(scan, _truth(data))
    audit = result.audit
    return {
        "renderer": renderer,
        "n": n,
        "size": size,
        "generate": None if reuse else gen_timer.record(n),
        "scan": scan_timer.record(n),
        "make_splits": split_timer.record(n),
        "over_merge": {
            "single_linkage_uncut": over_merge(dataset.make_splits(scan, seed=0, **UNCUT), patients),
            "default": over_merge(result, patients),
        },
        "grouped_audit": {
            key: audit[key]
            for key in ("max_proportion_error", "groups", "group_cuts", "exact_duplicates", "near_duplicates")
        }
        | {"leaked_images": audit["leaked_images"], "warnings": audit["warnings"]},
        "random_mode_leak": dataset.make_splits(scan, seed=0, mode="random").audit["leak"],
        "hash_distances": distance_profile(scan, patients),
        "series_distances": series_profile(scan, patients),
    }


def _generator_lines(records: dict[str, dict]) -> list[str]:
    lines = [
        "## Phantom generator",
        "",
        "| renderer | images | size | wall s | CPU s (this process) | images/s (wall) | images/s (CPU) | "
        "load avg before -> after | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for renderer, gen in records.items():
        lines.append(
            f"| {renderer} | {gen['n']} | {gen['size']} | {gen['wall_s']} | {gen['cpu_s']} | "
            f"{gen['images_per_s_wall']} | {gen['images_per_s_cpu']} | {harness.recorded_load(gen, 'before')} -> "
            f"{harness.recorded_load(gen, 'after')} | `{gen['command']}` |"
        )
    return lines + [""]


def _over_merge_lines(records: dict[str, dict]) -> list[str]:
    lines = [
        "## Over-merging: content groups vs the phantom's patients",
        "",
        "Patients come from each renderer's `phantom_truth.csv`, used only here. *Uncut*: plain",
        "single linkage over duplicate, near-duplicate and series links; *default*: the split as",
        "shipped (groups cut at their weakest links, see `dataset.grouping._cut_groups`).",
        "",
        "| run | patients | largest group, uncut (share, patients) | largest group, default (share, patients) | "
        "most patients in a group | patients crossing splits | largest class-share error | "
        "fewest val/test images of a class | links cut |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run, split in records.items():
        uncut, shipped = split["over_merge"]["single_linkage_uncut"], split["over_merge"]["default"]
        lines.append(
            f"| {run} | {shipped['patients']} | {uncut['largest_group']} ({uncut['largest_group_share']:.1%}, "
            f"{uncut['patients_in_largest_group']}) | {shipped['largest_group']} "
            f"({shipped['largest_group_share']:.1%}, {shipped['patients_in_largest_group']}) | "
            f"{shipped['most_patients_in_one_group']} | {shipped['patients_crossing_splits']} | "
            f"{shipped['max_proportion_error']:.1%} | {shipped['fewest_val_test_images_of_a_class']} | "
            f"{shipped['links_cut']} |"
        )
    lines += [
        "",
        "Series links, as distance over `--series-distance` (the split may cut one of at least "
        f"{grouping.WEAK_SERIES_LINK}",
        "to deal a class's groups finer; stronger ones only to respect `--max-group-share`):",
        "",
        "| run | same-patient links | p50 / p99 / max | between-patient links | min / p1 / p50 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run, split in records.items():
        series = split["series_distances"]
        lines.append(
            f"| {run} | {series['same_patient_links']} | {series['same_patient_p50_p99_max']} | "
            f"{series['between_patient_links']} | {series['between_patient_min_p1_p50']} |"
        )
    return lines + [""]


def _split_lines(run: str, split: dict) -> list[str]:
    lines = [f"### {run}", "", f"`{split['command']}`", "",
             "| step | wall s | CPU s | images/s (wall) | load avg before -> after |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for step in ("generate", "scan", "make_splits"):
        r = split[step]
        if r is None:
            continue
        lines.append(
            f"| {step} ({split['n']} images, {split['size']} px) | {r['wall_s']} | {r['cpu_s']} | "
            f"{r['images_per_s_wall']} | {harness.recorded_load(r, 'before')} -> {harness.recorded_load(r, 'after')} |"
        )
    return lines + ["", "Grouped split audit: `" + json.dumps(split["grouped_audit"]) + "`", "",
                    "Random mode on the same scan (the leak it makes): `" + json.dumps(split["random_mode_leak"]) + "`", "",
                    "Perceptual-hash distances (256 bits) on a sample: `" + json.dumps(split["hash_distances"]) + "`", ""]  # fmt: skip


def _machine_line(results: dict[str, object]) -> str:
    m = results.get("machine", {})
    if "cpu" in m:  # a record from before the harness: its own machine fields
        cpu, cpus, niceness, date = m.get("cpu"), m.get("cpus_visible"), m.get("niceness"), m.get("date")
    else:
        cpu, cpus, niceness, date = (
            m["cpu_model"],
            m["cores_host"],
            results["niceness"],
            results["started_utc"],
        )
    return (f"Machine: {cpu}, {cpus} CPUs visible (shared with other jobs), Python {m.get('python')}, "
            f"numpy {m.get('numpy')}, niceness {niceness}, {date}.")  # fmt: skip


def render(results: dict[str, object]) -> str:
    lines = [
        "# Data benchmarks",
        "",
        "Recorded by `benchmarks/bench_data.py`; raw numbers in `data.json`.",
        "",
    ]
    lines += [_machine_line(results), ""]
    if results.get("generator"):
        lines += _generator_lines(results["generator"])
    splits = results.get("split", {})
    if splits:
        lines += _over_merge_lines(splits)
        lines += ["## Scan + split", ""]
        for run, split in splits.items():
            lines += _split_lines(run, split)
    return "\n".join(lines + NOTES) + "\n"


NOTES = [
    "## Reading these numbers",
    "",
    "- The machine has 2 vCPUs shared with other engineers' jobs while these ran (see the load",
    "  averages), and the runs were niced. `CPU s` is this single-threaded process's own CPU",
    "  time: the best estimate of the time on one idle core. Wall time is what it took here.",
    "- 64-bit perceptual hashes cannot separate CT slices of different patients (every slice",
    "  shows the same body outline); the split uses 256-bit hashes (16x16 DCT). Even so, adjacent",
    "  slices of one patient can flip many bits (bits near the median flip under a one-pixel",
    "  shift, worst in small images), so consecutively numbered files whose 16x16 thumbnails",
    "  look alike are linked too (`--series-distance`). This uses only file names and pixels,",
    "  so it works on the real Kaggle files; `phantom_truth.csv` is used only to measure it.",
    "- Single linkage chains: when patients look alike, each links to the next and a group can",
    "  swallow a large share of a class, which no assignment can split 70/15/15. Groups above",
    "  `--max-group-share` (5% of the images) are cut at their weakest links; so are groups too",
    "  coarse for a class's shares (`--proportion-tolerance`), except at strong series links.",
    "  A val/test image with a near twin in train across a cut link counts as leaked in the",
    "  audit: a look-alike neighbour, possibly of the same patient.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("generator", "split", "all"), default="all")
    parser.add_argument(
        "--renderer", choices=[s.value for s in PhantomStyle], default=PhantomStyle.classic.value
    )
    parser.add_argument("--generator-n", type=int, default=2000)
    parser.add_argument("--split-n", type=int, default=818)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, help="Keep (and reuse) the generated images here.")
    parser.add_argument("--render-only", action="store_true", help="rewrite data.md from data.json")
    args = parser.parse_args()
    out = args.out / "data"
    results = harness.read_results(out) or {}
    if args.render_only:
        harness.write_markdown(out, render(results))
        return
    results.update(harness.start_record(niceness=os.nice(0)))
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        measure(args, results, Path(args.workdir or tmp))
    harness.finish_record(results)
    harness.write_results(out, results, render(results))


def measure(args: argparse.Namespace, results: dict, workdir: Path) -> None:
    """Run the steps ``--only`` asks for, filing each record into ``results``."""
    command = harness.command_line()
    if args.only in ("generator", "all"):
        record = {**bench_generator(args.renderer, args.generator_n, args.size, workdir), "command": command}
        results.setdefault("generator", {})[args.renderer] = record
        print(json.dumps(record, indent=2))
    if args.only in ("split", "all"):
        run = f"{args.renderer} {args.split_n}"
        split = {**bench_split(args.renderer, args.split_n, args.size, workdir), "command": command}
        if split["generate"] is None:  # the phantom was reused: keep the generation time recorded with it
            split["generate"] = results.get("split", {}).get(run, {}).get("generate")
        results.setdefault("split", {})[run] = split
        print(json.dumps(split, indent=2))


if __name__ == "__main__":
    main()
