"""Data benchmarks: phantom generator speed, and scan + split time and grouping quality at scale.

    python benchmarks/bench_data.py                      # both (generator: 2,000 at 512 px; split: 12,500)
    python benchmarks/bench_data.py --only generator
    nice python benchmarks/bench_data.py --only split --split-n 12500

Writes benchmarks/results/data.json and data.md (merging with what is there). Wall time on a
shared machine depends on the load, so the CPU time of this process, the load average and the
CPU model are recorded next to it. Single-threaded: BLAS threads are pinned to 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from kidney_edge import dataset, phantom  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, object]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus_visible": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "niceness": os.nice(0),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


class Timer:
    def __enter__(self) -> Timer:
        self.load_before = os.getloadavg()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        self.load_after = os.getloadavg()

    def record(self, n: int) -> dict[str, object]:
        return {
            "wall_s": round(self.wall, 2),
            "cpu_s": round(self.cpu, 2),
            "images_per_s_wall": round(n / self.wall, 1),
            "images_per_s_cpu": round(n / self.cpu, 1),
            "loadavg_1_5_15_before": [round(v, 2) for v in self.load_before],
            "loadavg_1_5_15_after": [round(v, 2) for v in self.load_after],
        }


def bench_generator(n: int, size: int, workdir: Path) -> dict[str, object]:
    with Timer() as timer:
        summary = phantom.synthesize(workdir / "gen", n=n, size=size, seed=0)
    return {
        "n": n,
        "size": size,
        "patients": summary.n_patients,
        **timer.record(n),
        "target": "< 30 s on one core",
    }


def _truth(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "phantom_truth.csv", newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def grouping_quality(scan: dataset.DatasetScan, result: dataset.SplitResult, truth: dict) -> dict[str, int]:
    """How well the content-only groups recover the phantom patients (never used by the product)."""
    patient_of = {
        row.path: truth[row.path.relative_to(scan.root).as_posix()]["patient"] for row in result.rows
    }
    groups_of, splits_of, patients_in = defaultdict(set), defaultdict(set), defaultdict(set)
    for row in result.rows:
        groups_of[patient_of[row.path]].add(row.group)
        splits_of[patient_of[row.path]].add(row.split)
        patients_in[row.group].add(patient_of[row.path])
    return {
        "patients": len(groups_of),
        "patients_crossing_splits": sum(len(s) > 1 for s in splits_of.values()),
        "patients_in_several_groups": sum(len(g) > 1 for g in groups_of.values()),
        "groups_joining_several_patients": sum(len(p) > 1 for p in patients_in.values()),
        "most_patients_in_one_group": max(len(p) for p in patients_in.values()),
    }


def distance_profile(scan: dataset.DatasetScan, truth: dict, sample: int = 3000) -> dict[str, object]:
    """Perceptual-hash distances within and between phantom patients on a sample (sets the default)."""
    rng = np.random.default_rng(0)
    pick = rng.choice(len(scan.items), size=min(sample, len(scan.items)), replace=False)
    items = [scan.items[i] for i in pick]
    patients = np.array([truth[i.path.relative_to(scan.root).as_posix()]["patient"] for i in items])
    words = np.frombuffer(b"".join(i.phash for i in items), np.uint64).reshape(len(items), -1)
    same_all, other_all = [], []
    for start in range(0, len(items), 256):
        d = np.bitwise_count(words[start : start + 256, None] ^ words[None]).sum(-1)  # (b, N)
        rows = np.arange(start, start + len(d))[:, None]
        cols = np.arange(len(items))[None, :]
        upper = cols > rows
        same = patients[rows] == patients[cols]
        same_all.append(d[upper & same])
        other_all.append(d[upper & ~same])
    same_d, other_d = np.concatenate(same_all), np.concatenate(other_all)
    pct = [50, 99, 100]
    return {
        "sample_images": len(items),
        "same_patient_bits_p50_p99_max": [float(np.percentile(same_d, p)) for p in pct],
        "other_patients_bits_min_p0.001_p0.01_p1": [
            float(np.percentile(other_d, p)) for p in (0, 0.001, 0.01, 1)
        ],
        "other_patient_pairs": int(len(other_d)),
        "other_pairs_within_default": int((other_d <= dataset.DEFAULT_NEAR_DUP_DISTANCE).sum()),
    }


def bench_split(n: int, size: int, workdir: Path) -> dict[str, object]:
    data = workdir / "split"
    reuse = (data / "phantom_truth.csv").is_file() and len(_truth(data)) == n
    with Timer() as gen_timer:
        if reuse:  # the recorded generation time of the earlier run is kept
            print(f"reusing the phantom in {data}; generation not timed", file=sys.stderr)
        else:
            phantom.synthesize(data, n=n, size=size, seed=1)
    with Timer() as scan_timer:
        scan = dataset.scan_dataset(data)
    with Timer() as split_timer:
        result = dataset.make_splits(scan, seed=0)
    random_audit = dataset.make_splits(scan, seed=0, mode="random").audit
    truth = _truth(data)
    audit = result.audit
    return {
        "n": n,
        "size": size,
        "generate": None if reuse else gen_timer.record(n),
        "scan": scan_timer.record(n),
        "make_splits": split_timer.record(n),
        "grouped_audit": {
            "max_proportion_error": audit["max_proportion_error"],
            "groups": audit["groups"],
            "exact_duplicates": audit["exact_duplicates"],
            "near_duplicates": audit["near_duplicates"],
            "leaked_images": audit["leaked_images"],
        },
        "random_mode_leak": random_audit["leak"],
        "grouping_vs_phantom_patients": grouping_quality(scan, result, truth),
        "hash_distances": distance_profile(scan, truth),
    }


def write_markdown(results: dict[str, object], path: Path) -> None:
    lines = [
        "# Data benchmarks",
        "",
        "Recorded by `benchmarks/bench_data.py`; raw numbers in `data.json`.",
        "",
    ]
    m = results.get("machine", {})
    lines += [f"Machine: {m.get('cpu')}, {m.get('cpus_visible')} CPUs visible (shared with other jobs), "
              f"Python {m.get('python')}, numpy {m.get('numpy')}, niceness {m.get('niceness')}, {m.get('date')}.", ""]  # fmt: skip
    gen = results.get("generator")
    if gen:
        lines += [
            "## Phantom generator",
            "",
            f"`{gen['command']}`",
            "",
            "| images | size | wall s | CPU s (this process) | images/s (wall) | images/s (CPU) | load avg before -> after |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {gen['n']} | {gen['size']} | {gen['wall_s']} | {gen['cpu_s']} | {gen['images_per_s_wall']} | "
            f"{gen['images_per_s_cpu']} | {gen['loadavg_1_5_15_before']} -> {gen['loadavg_1_5_15_after']} |",
            "",
        ]
    split = results.get("split")
    if split:
        lines += ["## Scan + split", "", f"`{split['command']}`", "",
                  "| step | wall s | CPU s | images/s (wall) | load avg before -> after |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for step in ("generate", "scan", "make_splits"):
            r = split[step]
            if r is None:
                continue
            lines.append(
                f"| {step} ({split['n']} images, {split['size']} px) | {r['wall_s']} | {r['cpu_s']} | "
                f"{r['images_per_s_wall']} | {r['loadavg_1_5_15_before']} -> {r['loadavg_1_5_15_after']} |"
            )
        lines += ["", "Grouped split audit: `" + json.dumps(split["grouped_audit"]) + "`", "",
                  "Random mode on the same scan (the leak it makes): `" + json.dumps(split["random_mode_leak"]) + "`", "",
                  "Content groups vs the phantom's patients (truth file used only here): `"
                  + json.dumps(split["grouping_vs_phantom_patients"]) + "`", "",
                  "Perceptual-hash distances (256 bits) on a sample: `" + json.dumps(split["hash_distances"]) + "`", ""]  # fmt: skip
    path.write_text("\n".join(lines + NOTES) + "\n")


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
    "- Over-grouping (one group holding several phantom patients) only makes the split more",
    "  conservative; the proportions stay on target (`max_proportion_error`).",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("generator", "split", "all"), default="all")
    parser.add_argument("--generator-n", type=int, default=2000)
    parser.add_argument("--split-n", type=int, default=12500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, help="Keep (and reuse) the generated images here.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "data.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    results["machine"] = machine()
    command = "python " + " ".join(sys.argv)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = args.workdir or tmp
        if args.only in ("generator", "all"):
            results["generator"] = {
                **bench_generator(args.generator_n, args.size, Path(tmp)),
                "command": command,
            }
            print(json.dumps(results["generator"], indent=2))
        if args.only in ("split", "all"):
            split = {**bench_split(args.split_n, args.size, Path(tmp)), "command": command}
            if split["generate"] is None:
                split["generate"] = results.get("split", {}).get("generate")
            results["split"] = split
            print(json.dumps(results["split"], indent=2))
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.out / "data.md")


if __name__ == "__main__":
    main()
