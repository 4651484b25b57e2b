"""Where the kidney band (``train --region kidneys``) lands, checked against the phantoms' truth.

For every slice of a phantom family with a finding, the band found from the image alone
(:func:`kidney_edge.regions.region_box`) is compared with the renderer's lesion disc and, where
the renderer records it, the kidneys' box: the share held whole, the share whose centre is
held, how much of the slice the band keeps, how often no band is found (the whole slice is
used), and what finding it costs per slice.

    python benchmarks/bench_region.py --workdir /work/data --data-seed 11 --n-images 800
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import _harness as harness
import numpy as np

FAMILIES = {name: harness.PHANTOM_FAMILIES[name] for name in ("classic", "classic-easy", "lookalike")}
TIMED_SLICES = 200  # slices timed per family, after one warm-up pass


def family_data(workdir: Path, family: str, data_seed: int, n_images: int, slice_size: int) -> Path:
    """The phantom folder bench_recipe.py uses for this family and seed (made if missing)."""
    from kidney_edge.phantoms.styles import synthesizer

    data = workdir / harness.phantom_folder(family, data_seed, n_images, slice_size)
    if not (data / "phantom_truth.csv").is_file():
        style, difficulty = FAMILIES[family]
        synthesizer(style)(data, n=n_images, seed=data_seed, size=slice_size, difficulty=difficulty)
    return data


def _inside(box: tuple[int, int, int, int], x0: float, y0: float, x1: float, y1: float) -> bool:
    return box[0] <= x0 and x1 <= box[2] and box[1] <= y0 and y1 <= box[3]


def measure(data: Path) -> dict[str, Any]:
    from PIL import Image

    from kidney_edge.regions import region_box
    from kidney_edge.spec import RegionRule

    with open(data / "phantom_truth.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if not row.get("duplicate_of")]
    lesion_whole, lesion_centre, kidneys_whole, missing, widths, heights = [], [], [], 0, [], []
    timed = []  # the first TIMED_SLICES slices, decoded once, for _time_finder
    for row in rows:
        with Image.open(data / row["path"]) as image:
            image.load()
        if len(timed) < TIMED_SLICES:
            timed.append(image.convert("L"))
        box = region_box(image, RegionRule.KIDNEYS)
        if box is None:
            missing += 1
            continue
        widths.append((box[2] - box[0]) / image.width)
        heights.append((box[3] - box[1]) / image.height)
        if row.get("kidneys_box"):
            kx0, ky0, kx1, ky1 = (float(v) for v in row["kidneys_box"].split())
            kidneys_whole.append(_inside(box, kx0, ky0, kx1, ky1))
        if row["lesion_x"]:
            x, y, r = float(row["lesion_x"]), float(row["lesion_y"]), float(row["lesion_radius_px"])
            lesion_whole.append(_inside(box, x - r, y - r, x + r, y + r))
            lesion_centre.append(_inside(box, x, y, x, y))
    return {
        "slices": len(rows),
        "no_band": missing,
        "findings": len(lesion_whole),
        "lesion_whole_share": float(np.mean(lesion_whole)),
        "lesion_centre_share": float(np.mean(lesion_centre)),
        "kidneys_whole_share": float(np.mean(kidneys_whole)) if kidneys_whole else None,
        "band_width_share": [float(np.percentile(widths, q)) for q in (10, 50, 90)],
        "band_height_share": [float(np.percentile(heights, q)) for q in (10, 50, 90)],
        "ms_per_slice": _time_finder(timed),
    }


def _time_finder(images: list[Any]) -> float:
    """Median milliseconds of region_box per decoded slice (decoding not counted)."""
    from kidney_edge.regions import region_box
    from kidney_edge.spec import RegionRule

    times = []
    for image in images + images:  # the first pass warms caches; the second is timed
        started = time.perf_counter()
        region_box(image, RegionRule.KIDNEYS)
        times.append(time.perf_counter() - started)
    return float(np.median(times[len(images):]) * 1000)


def render(record: dict[str, Any]) -> str:
    lines = [
        "# The kidney band against the phantoms' truth",
        "",
        f"Recorded by `benchmarks/bench_region.py` at commit {record['commit'][:7]}; machine: "
        f"{harness.cpu_kind(record['machine'])}, load average "
        f"{harness.recorded_load(record, 'before')} -> {harness.recorded_load(record, 'after')}. "
        f"Phantom seed {record['args']['data_seed']}, {record['args']['n_images']} slices per family "
        "(byte copies left out). The band is `kidney_edge.regions.region_box` with `--region kidneys`, "
        "found from each image alone; the truth is the renderer's `phantom_truth.csv`.",
        "",
        f"The band at this commit reaches {record['reach']['side']:.0%} of the body's width to either side of the "
        f"spine's centre, {record['reach']['up']:.0%} of the body's height forward (up) and "
        f"{record['reach']['down']:.0%} back (`KIDNEY_REACH`).",
        "",
        "| family | slices | no band found | findings | lesion held whole | lesion centre held | kidneys' box held whole | band width / height, share of the slice (median [p10, p90]) | finder ms per slice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, m in record["families"].items():
        kidneys = "-" if m["kidneys_whole_share"] is None else f"{m['kidneys_whole_share']:.1%}"
        w, h = m["band_width_share"], m["band_height_share"]
        lines.append(
            f"| {family} | {m['slices']} | {m['no_band']} | {m['findings']} | {m['lesion_whole_share']:.1%} | "
            f"{m['lesion_centre_share']:.1%} | {kidneys} | {w[1]:.2f} [{w[0]:.2f}, {w[2]:.2f}] / "
            f"{h[1]:.2f} [{h[0]:.2f}, {h[2]:.2f}] | {m['ms_per_slice']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kidney-edge-recipe"))
    parser.add_argument("--data-seed", type=int, default=11)
    parser.add_argument("--n-images", type=int, default=800)
    parser.add_argument("--slice-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "region")
    args = parser.parse_args(argv)
    record = harness.start_record(args={k: str(v) for k, v in vars(args).items() if k != "out"})
    from kidney_edge.regions import KIDNEY_REACH

    record["reach"] = dict(KIDNEY_REACH)
    record["families"] = {}
    for family in args.families:
        data = family_data(args.workdir, family, args.data_seed, args.n_images, args.slice_size)
        record["families"][family] = measure(data)
        harness.log(f"{family}: {record['families'][family]}")
    harness.finish_record(record)
    harness.write_results(args.out, record, render(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
