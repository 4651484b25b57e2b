"""The split: scan -> groups -> assignment -> rows and audit; :func:`split_dataset` also
writes ``splits.csv`` and its audit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kidney_edge.dataset.assignment import assign_grouped, assign_random
from kidney_edge.dataset.audit import leakage_audit
from kidney_edge.dataset.config import (
    DEFAULT_MAX_GROUP_SHARE,
    DEFAULT_MIN_EVAL_IMAGES,
    DEFAULT_NEAR_DUP_DISTANCE,
    DEFAULT_PROPORTION_TOLERANCE,
    DEFAULT_SERIES_DISTANCE,
    SplitConfig,
)
from kidney_edge.dataset.grouping import group_items
from kidney_edge.dataset.manifest import SPLITS, SplitRow, audit_path, write_splits
from kidney_edge.dataset.scan import DatasetScan, ProgressFn, scan_dataset
from kidney_edge.errors import InputError
from kidney_edge.io_utils import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitResult:
    """A split's rows (in scan order) and its leakage audit."""

    rows: list[SplitRow]
    audit: dict[str, Any]


def make_splits(
    scan: DatasetScan,
    *,
    ratios: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    mode: str = "grouped",
    group_pattern: str | None = None,
    near_dup_distance: int | None = DEFAULT_NEAR_DUP_DISTANCE,
    series_distance: float | None = DEFAULT_SERIES_DISTANCE,
    max_group_share: float | None = DEFAULT_MAX_GROUP_SHARE,
    proportion_tolerance: float = DEFAULT_PROPORTION_TOLERANCE,
    min_eval_images: int = DEFAULT_MIN_EVAL_IMAGES,
) -> SplitResult:
    """Stratified train/val/test split of ``scan``; deterministic for ``seed``.

    ``grouped`` (default): duplicate, near-duplicate and pattern groups never cross splits.
    Near-duplicate and series groups are cut at their weakest links where they hold more than
    ``max_group_share`` of the images (None: no limit) or are too coarse to split every class
    within ``proportion_tolerance``. Validation and test aim at ``min_eval_images`` of every
    class. The audit's ``warnings`` say where a goal was missed.
    ``random``: every image on its own, which leaks; it exists to show that, and says so.
    """
    config = SplitConfig(
        ratios=tuple(float(r) for r in ratios),
        seed=seed,
        mode=mode,
        group_pattern=group_pattern,
        near_dup_distance=near_dup_distance,
        series_distance=series_distance,
        max_group_share=max_group_share,
        proportion_tolerance=proportion_tolerance,
        min_eval_images=min_eval_images,
    )
    return split_scan(scan, config)


def split_scan(scan: DatasetScan, config: SplitConfig) -> SplitResult:
    """:func:`make_splits` for a ready :class:`SplitConfig`."""
    if not scan.items:
        raise InputError(f"no usable images in {scan.root} to split")
    grouping = group_items(scan, config)
    class_index = np.array([scan.class_names.index(item.label) for item in scan.items])
    if config.mode == "random":
        log.warning(
            "--split-mode random puts every image on its own: duplicates and adjacent slices of one "
            "patient land in different splits, so validation/test scores are inflated (see the audit)"
        )
        split_of = assign_random(class_index, len(scan.class_names), config.ratios, config.seed)
    else:
        per_group = assign_grouped(grouping.group_of, class_index, grouping.targets, config.seed)
        split_of = per_group[grouping.group_of]
    rows = [
        SplitRow(item.path, item.label, SPLITS[s], grouping.names[g], item.sha256)
        for item, s, g in zip(scan.items, split_of, grouping.group_of, strict=True)
    ]
    return SplitResult(rows, leakage_audit(scan, rows, grouping, config))


def split_dataset(
    data_dir: str | Path,
    out_csv: str | Path,
    config: SplitConfig | None = None,
    *,
    progress: ProgressFn | None = None,
) -> SplitResult:
    """Scan ``data_dir``, split it under ``config`` (default: :class:`SplitConfig`'s defaults),
    write ``out_csv`` and ``<stem>_audit.json`` beside it."""
    scan = scan_dataset(data_dir, progress=progress)
    result = split_scan(scan, config or SplitConfig())
    write_splits(result.rows, out_csv)
    atomic_write_json(audit_path(out_csv), result.audit)
    log.info("wrote %s and %s", out_csv, audit_path(out_csv))
    return result
