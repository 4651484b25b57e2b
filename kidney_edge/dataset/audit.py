"""The leakage audit of a split: counts per split and class, the groups found and cut,
every val/test image with a twin in train, and the goals of the split that were missed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np

from kidney_edge.dataset.config import SplitConfig
from kidney_edge.dataset.grouping import Grouping
from kidney_edge.dataset.manifest import SPLITS, SplitRow
from kidney_edge.dataset.scan import HASH_SIZE, DatasetScan


def leakage_audit(
    scan: DatasetScan, rows: list[SplitRow], grouping: Grouping, config: SplitConfig
) -> dict[str, Any]:
    """Counts per split and class, the groups found and cut, every val/test image with a twin in
    train, and ``warnings``: each goal of the split that was missed, in words."""
    split_index = np.array([SPLITS.index(row.split) for row in rows])
    counts = {s: {c: 0 for c in scan.class_names} for s in SPLITS}
    for row in rows:
        counts[row.split][row.label] += 1
    totals = {c: sum(counts[s][c] for s in SPLITS) for c in scan.class_names}
    proportions = {
        c: {s: round(counts[s][c] / max(totals[c], 1), 4) for s in SPLITS} for c in scan.class_names
    }
    error = max(
        abs(proportions[c][s] - r)
        for c in scan.class_names
        for s, r in zip(SPLITS, config.ratios, strict=True)
    )
    train_hashes = {row.sha256 for row in rows if row.split == "train"}
    exact_twin = np.array([row.split != "train" and row.sha256 in train_hashes for row in rows])
    near_twin = np.zeros(len(rows), dtype=bool)
    for i, j in grouping.near_pairs:
        if split_index[i] == 0 and split_index[j] != 0:
            near_twin[j] = True
        elif split_index[j] == 0 and split_index[i] != 0:
            near_twin[i] = True
    near_twin &= ~exact_twin
    splits_per_group: dict[int, set[int]] = defaultdict(set)
    labels_per_group: dict[int, set[str]] = defaultdict(set)
    for g, s, row in zip(grouping.group_of, split_index, rows, strict=True):
        splits_per_group[int(g)].add(int(s))
        labels_per_group[int(g)].add(row.label)
    group_sizes = Counter(int(g) for g in grouping.group_of)
    conflicts = [p for p in scan.problems if p.reason.startswith("label conflict")]
    leak = {
        s: {
            "images": int((split_index == k).sum()),
            "exact_twin_in_train": int((exact_twin & (split_index == k)).sum()),
            "near_twin_in_train": int((near_twin & (split_index == k)).sum()),
        }
        for k, s in enumerate(SPLITS)
        if s != "train"
    }
    audit = {
        "mode": config.mode,
        "seed": config.seed,
        "ratios": list(config.ratios),
        "near_dup_distance": config.near_dup_distance,
        "series_distance": config.series_distance,
        "hash_bits": HASH_SIZE**2,
        "group_pattern": config.group_pattern,
        "dataset": str(scan.root),
        "n_images": len(rows),
        "class_names": list(scan.class_names),
        "counts": counts,
        "proportions": proportions,
        "max_proportion_error": round(error, 4),
        "groups": {
            "total": len(group_sizes),
            "with_several_images": sum(1 for n in group_sizes.values() if n > 1),
            "largest": max(group_sizes.values()),
            "largest_share": round(max(group_sizes.values()) / len(rows), 4),
            "crossing_splits": sum(1 for s in splits_per_group.values() if len(s) > 1),
            "with_mixed_labels": sum(1 for labels in labels_per_group.values() if len(labels) > 1),
        },
        "exact_duplicates": {"groups": grouping.exact_groups, "files": grouping.exact_files},
        "near_duplicates": {
            "groups": grouping.near_groups,
            "files": grouping.near_files,
            "hash_pairs": grouping.hash_pairs,
            "series_pairs": grouping.series_pairs,
        },
        "near_twin_means": "a perceptual-hash near duplicate, or a neighbouring file number that looks alike",
        "pattern_groups": grouping.pattern_groups,
        "group_cuts": {
            "max_group_share": config.max_group_share,
            "bound_images": grouping.bound,
            "proportion_tolerance": config.proportion_tolerance,
            "links_cut": grouping.links_cut,
            "groups_cut": grouping.groups_cut,
        },
        "min_eval_images": config.min_eval_images,
        "leak": leak,
        "leaked_images": sum(v["exact_twin_in_train"] + v["near_twin_in_train"] for v in leak.values()),
        "label_conflicts": {"files": len(conflicts), "paths": [str(p.path) for p in conflicts]},
        "scan_problems": [{"path": str(p.path), "reason": p.reason} for p in scan.problems],
    }
    oversized = {
        grouping.names[g]: (n, len({rows[i].sha256 for i in np.nonzero(grouping.group_of == g)[0]}) == 1)
        for g, n in group_sizes.items()
        if grouping.bound is not None and n > grouping.bound
    }
    held = np.array([[counts[s][c] for c in scan.class_names] for s in SPLITS])
    off_ratio = [scan.class_names[c] for c in grouping.targets.off_ratio(held)]
    audit["warnings"] = _audit_warnings(audit, off_ratio, oversized, config)
    return audit


def _audit_warnings(
    audit: dict[str, Any], off_ratio: list[str], oversized: dict[str, tuple[int, bool]], config: SplitConfig
) -> list[str]:
    """The goals of the split it missed: leaks, small val/test classes, proportions, large groups.

    ``off_ratio``: classes whose split shares miss the ratios by more than the tolerance (or one
    image). ``oversized``: group name -> (images, whether they are all byte-identical) for groups
    above the bound, which only an exact-duplicate set or a --group-pattern key can be.
    """
    warnings = []
    if audit["leaked_images"] and config.mode == "random":
        warnings.append(
            f"{audit['leaked_images']} validation/test images have a twin in train: their scores will be "
            "inflated (use --split-mode grouped)"
        )
    elif audit["leaked_images"]:  # grouped: exact copies never cross, so only cut links can
        warnings.append(
            f"{audit['leaked_images']} validation/test images have a near twin in train across a link cut "
            "to keep groups within bounds (a look-alike neighbour, possibly of the same patient)"
        )
    for name in audit["class_names"]:
        total = sum(audit["counts"][s][name] for s in SPLITS)
        for s, ratio in zip(SPLITS[1:], config.ratios[1:], strict=True):
            held = audit["counts"][s][name]
            if ratio > 0 and held < config.min_eval_images:
                why = (
                    f"the class has only {total}"
                    if ratio * total < config.min_eval_images
                    else "its groups could not be dealt finer"
                )
                warnings.append(
                    f"{s} holds {held} {name} image(s), fewer than --min-eval-images {config.min_eval_images} "
                    f"({why}); its {name} scores rest on very few images"
                )
    if config.mode == "grouped" and off_ratio:
        warnings.append(
            f"{', '.join(off_ratio)}: split shares off the ratios by more than --proportion-tolerance "
            f"{config.proportion_tolerance} (or one image), up to {audit['max_proportion_error']:.1%} "
            "(see proportions): groups too large to deal finer"
        )
    for group, (images, identical) in oversized.items():
        why = "byte-identical copies" if identical else "files sharing a --group-pattern key"
        warnings.append(
            f"group {group} holds {images} images ({images / audit['n_images']:.1%}), above the "
            f"{audit['group_cuts']['bound_images']}-image bound (--max-group-share): {why}, kept whole"
        )
    return warnings
