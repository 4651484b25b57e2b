"""Options of a split (:class:`SplitConfig`, the flags of ``kidney-edge split``) and their
defaults, each with the evidence it was chosen on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kidney_edge.dataset.scan import HASH_SIZE
from kidney_edge.errors import InputError

# Hamming distance (of 256 bits) below which two images are near duplicates. Chosen on phantom
# patients: adjacent slices of one patient stay within it, different patients rarely come close
# (distributions in benchmarks/results/data.md).
DEFAULT_NEAR_DUP_DISTANCE = 32
# Thumbnail difference below which consecutively numbered files are one series (see grouping.series_pairs);
# on phantom data adjacent slices of one patient stay below 0.16, neighbours from different patients above 0.18.
DEFAULT_SERIES_DISTANCE = 0.17
# Largest share of a dataset's images one group may hold (exact duplicates and --group-pattern
# keys excepted). Single-linkage grouping chains look-alike patients together; a group above a
# few percent cannot be placed without skewing a class's val/test share (validation and test are
# 15% each), so chains above it are cut at their weakest links (see grouping._cut_groups).
DEFAULT_MAX_GROUP_SHARE = 0.05
# Largest deviation of a class's split shares from the ratios (as a share of the class's images)
# that the grouped split aims at; a class whose groups are too coarse for it has them cut further.
DEFAULT_PROPORTION_TOLERANCE = 0.02
# Images of every class that validation and test should each hold: fewer make per-class recall a
# coin toss (one Stone in val decides its recall alone). Below it the audit warns.
DEFAULT_MIN_EVAL_IMAGES = 5


@dataclass(frozen=True)
class SplitConfig:
    """Options of ``kidney-edge split``; messages name the CLI flags."""

    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    mode: str = "grouped"
    group_pattern: str | None = None
    near_dup_distance: int | None = DEFAULT_NEAR_DUP_DISTANCE
    series_distance: float | None = DEFAULT_SERIES_DISTANCE
    max_group_share: float | None = DEFAULT_MAX_GROUP_SHARE
    proportion_tolerance: float = DEFAULT_PROPORTION_TOLERANCE
    min_eval_images: int = DEFAULT_MIN_EVAL_IMAGES

    def __post_init__(self) -> None:
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1) > 1e-6:
            raise InputError(
                f"--ratios must be three non-negative numbers summing to 1, e.g. 0.7,0.15,0.15 (got {self.ratios})"
            )
        if self.ratios[0] <= 0:
            raise InputError("--ratios: the train share must be above 0")
        if self.mode not in ("grouped", "random"):
            raise InputError(f"--split-mode must be 'grouped' or 'random' (got {self.mode!r})")
        if self.group_pattern is not None:
            try:
                re.compile(self.group_pattern)
            except re.error as exc:
                raise InputError(f"--group-pattern is not a valid regular expression: {exc}") from None
        if self.near_dup_distance is not None and not 0 <= self.near_dup_distance <= HASH_SIZE**2 // 2:
            raise InputError(
                f"--near-dup-distance must be between 0 and {HASH_SIZE**2 // 2} bits, or -1 to turn it off "
                f"(got {self.near_dup_distance})"
            )
        if self.series_distance is not None and not 0 <= self.series_distance <= 2:
            raise InputError(
                f"--series-distance must be between 0 and 2, or -1 to turn it off (got {self.series_distance})"
            )
        if self.max_group_share is not None and not 0 < self.max_group_share <= 1:
            raise InputError(
                "--max-group-share must be above 0 and at most 1 (a share of all images), or -1 to never "
                f"cut groups (got {self.max_group_share})"
            )
        if not 0 < self.proportion_tolerance <= 1:
            raise InputError(
                f"--proportion-tolerance must be above 0 and at most 1 (got {self.proportion_tolerance})"
            )
        if self.min_eval_images < 0:
            raise InputError(f"--min-eval-images must be 0 or more (got {self.min_eval_images})")
