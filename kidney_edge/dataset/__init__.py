"""Dataset scan, leakage-safe stratified splits and the leakage audit.

Published results on the Kaggle kidney CT dataset go wrong at the split: adjacent slices of one
patient and byte-identical copies land on both sides of a random split. Here the unit of the
split is a *group* of images that must stay together:

- exact duplicates (same sha256),
- near duplicates (perceptual hash within ``near_dup_distance`` bits; adjacent slices of one
  patient look nearly alike, so this also keeps most patients together) of one label,
- series neighbours: files of one label numbered next to each other whose thumbnails differ by
  at most ``series_distance`` (scanners number a patient's slices consecutively),
- optional patient groups from ``group_pattern``: a regex searched in the path relative to the
  dataset folder; the first capture group (or the whole match if the regex has no group) is the
  group key, so files with the same key stay together; files it does not match form no group.
  Example for the Kaggle names ``Cyst/Cyst- (123).jpg``: ``'^(.*\\(\\d*)\\d\\)'`` puts blocks of
  ten consecutive numbers (120-129) together.

Near-duplicate and series links join images by single linkage, which chains look-alike
patients into ever larger groups. A group above ``max_group_share`` of the images, or too coarse
for its class's split shares, is therefore cut at its weakest links; exact duplicates and
pattern keys are never cut.

Groups are assigned to train/val/test so that each class's split proportions match the target
ratios and validation and test hold ``min_eval_images`` of every class (greedy by group size,
local moves, then an exact deal for a class still off). The audit records counts, groups, cuts,
how many val/test images still have a twin in train (in ``grouped`` mode only across cut links)
and a ``warnings`` list of the goals missed.

Modules, in the order a split runs through them: :mod:`~kidney_edge.dataset.scan` (files,
classes, hashes), :mod:`~kidney_edge.dataset.config` (the options), :mod:`~kidney_edge.dataset.grouping`
(groups and their cuts), :mod:`~kidney_edge.dataset.assignment` (groups to splits),
:mod:`~kidney_edge.dataset.audit` (the leakage audit), :mod:`~kidney_edge.dataset.manifest`
(``splits.csv``) and :mod:`~kidney_edge.dataset.split` (the pipeline). This package re-exports
their public names.
"""

from kidney_edge.dataset.audit import leakage_audit
from kidney_edge.dataset.config import (
    DEFAULT_MAX_GROUP_SHARE,
    DEFAULT_MIN_EVAL_IMAGES,
    DEFAULT_NEAR_DUP_DISTANCE,
    DEFAULT_PROPORTION_TOLERANCE,
    DEFAULT_SERIES_DISTANCE,
    SplitConfig,
)
from kidney_edge.dataset.grouping import near_duplicate_pairs
from kidney_edge.dataset.manifest import (
    SPLITS,
    SplitRow,
    audit_path,
    data_fingerprint,
    read_splits,
    write_splits,
)
from kidney_edge.dataset.scan import (
    HASH_SIZE,
    IGNORED_FILES,
    LABELS_CSV,
    DatasetScan,
    ProgressFn,
    ScannedImage,
    ScanProblem,
    perceptual_hash,
    scan_dataset,
)
from kidney_edge.dataset.split import SplitResult, make_splits, split_dataset, split_scan

__all__ = [
    "DEFAULT_MAX_GROUP_SHARE",
    "DEFAULT_MIN_EVAL_IMAGES",
    "DEFAULT_NEAR_DUP_DISTANCE",
    "DEFAULT_PROPORTION_TOLERANCE",
    "DEFAULT_SERIES_DISTANCE",
    "HASH_SIZE",
    "IGNORED_FILES",
    "LABELS_CSV",
    "SPLITS",
    "DatasetScan",
    "ProgressFn",
    "ScanProblem",
    "ScannedImage",
    "SplitConfig",
    "SplitResult",
    "SplitRow",
    "audit_path",
    "data_fingerprint",
    "leakage_audit",
    "make_splits",
    "near_duplicate_pairs",
    "perceptual_hash",
    "read_splits",
    "scan_dataset",
    "split_dataset",
    "split_scan",
    "write_splits",
]
