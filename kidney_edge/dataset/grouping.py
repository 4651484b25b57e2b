"""Groups of images that must not cross splits: exact duplicates, near duplicates by
perceptual hash, series neighbours and ``--group-pattern`` keys, joined by single linkage and cut
at their weakest links where a chain grows too large or too coarse for its class's split shares.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kidney_edge.dataset.assignment import Targets, can_split
from kidney_edge.dataset.config import SplitConfig
from kidney_edge.dataset.scan import DatasetScan, ScannedImage

log = logging.getLogger(__name__)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def near_duplicate_pairs(hashes: Sequence[bytes], max_distance: int, chunk: int = 512) -> np.ndarray:
    """(P, 2) index pairs i < j whose hashes differ in at most ``max_distance`` bits.

    Vectorised XOR + popcount over uint64 words, a block of rows at a time: 12,500 hashes of
    256 bits take about a second.
    """
    if len(hashes) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    words = np.frombuffer(b"".join(hashes), dtype=np.uint64).reshape(len(hashes), -1)
    columns = [np.ascontiguousarray(words[:, w]) for w in range(words.shape[1])]
    found = []
    for start in range(0, len(words), chunk):
        # One uint64 word at a time, summed in uint16: numpy reduces a length-4 axis slowly.
        distance = np.zeros((min(chunk, len(words) - start), len(words) - start), dtype=np.uint16)
        for column in columns:
            distance += np.bitwise_count(column[start : start + chunk, None] ^ column[None, start:])
        i, j = np.nonzero(distance <= max_distance)  # j counts from `start`: only pairs with j >= i
        keep = j > i  # j is relative to `start`, i to the block
        found.append(np.stack([i[keep] + start, j[keep] + start], axis=1))
    return np.concatenate(found).astype(np.int64)


@dataclass(frozen=True)
class _Links:
    """Similarity links between items, each with how close it came to its threshold."""

    pairs: np.ndarray  # (P, 2) int64 item indices, i < j
    distance: np.ndarray  # (P,) float64 distance over the link's threshold: 0 alike .. 1 barely linked
    tier: np.ndarray  # (P,) int64: links of a lower tier are stronger evidence than any of a higher one

    @staticmethod
    def of(pairs: np.ndarray, distance: np.ndarray, tier: int) -> _Links:
        return _Links(pairs, distance, np.full(len(pairs), tier, dtype=np.int64))

    @staticmethod
    def empty() -> _Links:
        return _Links.of(np.zeros((0, 2), dtype=np.int64), np.zeros(0), 0)

    @staticmethod
    def concat(parts: Sequence[_Links]) -> _Links:
        return _Links(
            *(
                np.concatenate([getattr(part, name) for part in parts])
                for name in ("pairs", "distance", "tier")
            )
        )

    def where(self, keep: np.ndarray) -> _Links:
        return _Links(self.pairs[keep], self.distance[keep], self.tier[keep])


# Link tiers. Series links rank before every hash link: file order and looks together are
# stronger evidence of one patient than looks alone, which look-alike patients share, so a chain
# of look-alike patients is cut at its hash links first.
_SERIES_TIER, _HASH_TIER = 0, 1
# A series link at least this weak (distance over its threshold) may be cut to make a class's
# groups fine enough for its split shares; a stronger one, the best evidence of one patient
# there is, only to respect --max-group-share. Between adjacent slices of one phantom patient the
# distance stays below 0.6 on both renderers, between neighbouring patients above 0.9
# (series distances in benchmarks/results/data.md).
WEAK_SERIES_LINK = 0.75


def _scaled(distance: np.ndarray, threshold: float) -> np.ndarray:
    """Distances over the threshold that admitted them, so hash and series links compare."""
    distance = np.asarray(distance, dtype=np.float64)
    return distance / threshold if threshold > 0 else np.zeros_like(distance)


def _hash_distances(hashes: Sequence[bytes], pairs: np.ndarray) -> np.ndarray:
    """(P,) Hamming distance in bits between the hashes of each pair."""
    words = np.frombuffer(b"".join(hashes), dtype=np.uint64).reshape(len(hashes), -1)
    return np.bitwise_count(words[pairs[:, 0]] ^ words[pairs[:, 1]]).sum(axis=1)


@dataclass(frozen=True)
class Grouping:
    """The groups of a dataset (what :func:`group_items` returns) and the counts the audit reports."""

    group_of: np.ndarray  # (N,) group index per item
    names: list[str]
    near_pairs: np.ndarray  # (P, 2) near-duplicate or same-series pairs (different bytes)
    hash_pairs: int
    series_pairs: int
    exact_groups: int
    exact_files: int
    near_groups: int
    near_files: int
    pattern_groups: int | None
    targets: Targets  # per split and class: what the assignment aims at, and what the cuts allowed for
    bound: int | None  # most images a group may hold unless it is one atom; None: never cut
    links_cut: int
    groups_cut: int


def group_items(scan: DatasetScan, config: SplitConfig) -> Grouping:
    """Groups that must not cross splits.

    Exact duplicates and pattern keys are *atoms*, never divided. Near-duplicate and series links
    join atoms by single linkage, which chains: look-alike patients, each linked to the next, end
    up in one group. Such groups are cut at their weakest links until none holds more than
    ``max_group_share`` of the images and every class can be split within
    ``proportion_tolerance`` (:func:`_cut_groups`).
    """
    items = scan.items
    atoms_uf = _UnionFind(len(items))
    by_hash: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_hash[item.sha256].append(index)
    for members in by_hash.values():
        for other in members[1:]:
            atoms_uf.union(members[0], other)
    pattern_groups = _apply_pattern(scan, config.group_pattern, atoms_uf) if config.group_pattern else None
    hash_links, series_links = _similar_pairs(scan, config)
    links = _Links.concat([hash_links, series_links])
    class_index = np.array([scan.class_names.index(item.label) for item in items])
    tree = _dendrogram(
        np.array([atoms_uf.find(i) for i in range(len(items))]),
        class_index,
        len(scan.class_names),
        links,
    )
    bound = None
    if config.max_group_share is not None:
        bound = max(1, math.floor(config.max_group_share * len(items) + 1e-9))
    targets = Targets.of(
        np.bincount(class_index, minlength=len(scan.class_names)),
        config.ratios,
        config.min_eval_images,
        config.proportion_tolerance,
    )
    cut = _cut_groups(tree, len(items) if bound is None else bound, targets)
    order = sorted(range(len(items)), key=lambda i: items[i].path.as_posix())
    index_of_group: dict[int, int] = {}
    for i in order:  # number groups by their first file, so names are stable for a dataset
        index_of_group.setdefault(int(cut.group_of[i]), len(index_of_group))
    near_uf = _UnionFind(len(items))
    for i, j in links.pairs:
        near_uf.union(int(i), int(j))
    near_sizes = Counter(near_uf.find(i) for i in range(len(items)))
    exact_sizes = [len(m) for m in by_hash.values() if len(m) > 1]
    return Grouping(
        group_of=np.array([index_of_group[int(g)] for g in cut.group_of]),
        names=[f"g{k:05d}" for k in range(len(index_of_group))],
        near_pairs=np.unique(links.pairs, axis=0),
        hash_pairs=len(hash_links.pairs),
        series_pairs=len(series_links.pairs),
        exact_groups=len(exact_sizes),
        exact_files=sum(exact_sizes),
        near_groups=sum(1 for n in near_sizes.values() if n > 1),
        near_files=sum(n for n in near_sizes.values() if n > 1),
        pattern_groups=pattern_groups,
        targets=targets,
        bound=bound,
        links_cut=cut.links_cut,
        groups_cut=cut.groups_cut,
    )


@dataclass(frozen=True)
class _Dendrogram:
    """Single-linkage merge tree over atoms: nodes 0..n_atoms-1 are the atoms, and each later
    node k joins ``children[k]`` through the next-strongest link (Kruskal's algorithm)."""

    atom_of: np.ndarray  # (N,) atom (leaf node) per item
    children: np.ndarray  # (M, 2) int64 child nodes; -1 for atoms
    counts: np.ndarray  # (M, C) int64 images per node and class
    distance: np.ndarray  # (M,) float64 distance of the link that made each node; 0 for atoms
    tier: np.ndarray  # (M,) int64 tier of that link
    tops: list[int]  # one root per connected component

    def is_atom(self, node: int) -> bool:
        return bool(self.children[node, 0] < 0)

    def leaves(self, node: int) -> Iterator[int]:
        below = [node]
        while below:
            k = below.pop()
            if self.is_atom(k):
                yield k
            else:
                below.extend(self.children[k].tolist())


def _dendrogram(atom_of: np.ndarray, class_index: np.ndarray, n_classes: int, links: _Links) -> _Dendrogram:
    """Merge atoms (``atom_of``: an id per item, shared by items that must stay together) along
    ``links``, strongest first (lowest tier, then shortest distance); ties broken by atom index,
    so the tree is deterministic."""
    _, atom_index = np.unique(atom_of, return_inverse=True)
    n_atoms = int(atom_index.max()) + 1
    a, b = atom_index[links.pairs[:, 0]], atom_index[links.pairs[:, 1]]
    counts = np.zeros((2 * n_atoms - 1, n_classes), dtype=np.int64)
    np.add.at(counts, (atom_index, class_index), 1)
    children = np.full((2 * n_atoms - 1, 2), -1, dtype=np.int64)
    merge_distance, merge_tier = np.zeros(2 * n_atoms - 1), np.zeros(2 * n_atoms - 1, dtype=np.int64)
    uf = _UnionFind(n_atoms)
    node_of_root = list(range(n_atoms))
    node = n_atoms
    for e in np.lexsort((b, a, links.distance, links.tier)):
        ra, rb = uf.find(int(a[e])), uf.find(int(b[e]))
        if ra == rb:
            continue  # not a spanning-tree edge: the two are already joined by stronger links
        children[node] = node_of_root[ra], node_of_root[rb]
        counts[node] = counts[node_of_root[ra]] + counts[node_of_root[rb]]
        merge_distance[node], merge_tier[node] = links.distance[e], links.tier[e]
        uf.union(ra, rb)
        node_of_root[uf.find(ra)] = node
        node += 1
    tops = sorted({node_of_root[uf.find(k)] for k in range(n_atoms)})
    return _Dendrogram(
        atom_index, children[:node], counts[:node], merge_distance[:node], merge_tier[:node], tops
    )


@dataclass(frozen=True)
class _Cut:
    group_of: np.ndarray  # (N,) group id per item (equal within a group, not numbered 0..G-1)
    links_cut: int
    groups_cut: int  # connected components that were divided


def _cut_groups(tree: _Dendrogram, bound: int, targets: Targets) -> _Cut:
    """Cut the single-linkage groups of ``tree`` at their weakest links, as few as needed so that

    1. no group holds more than ``bound`` images (a single atom beyond it stays whole), and
    2. each class's groups can be dealt so that every split holds between ``targets.low`` and
       ``targets.high`` images of it (:func:`can_split`): while they cannot, the class's largest
       group is cut, unless its weakest link is a strong series link (``WEAK_SERIES_LINK``):
       a group of consecutive files that look alike is one patient more likely than a chain.

    Cutting a group's weakest link removes its largest minimum-spanning-tree edge, which undoes
    the last merge that made it: every group is a node of the dendrogram. A chain of look-alike
    patients breaks between patients first, whose links are weaker than those within one.
    """
    groups, stack, links_cut = [], list(tree.tops), 0
    while stack:
        node = stack.pop()
        if tree.counts[node].sum() > bound and not tree.is_atom(node):
            links_cut += 1
            stack.extend(tree.children[node].tolist())
        else:
            groups.append(node)
    for c in range(tree.counts.shape[1]):
        while not can_split(tree.counts[groups, c], targets.low[:, c], targets.high[:, c]):
            weak = [
                k
                for k, node in enumerate(groups)
                if tree.counts[node, c]
                and not tree.is_atom(node)
                and (tree.tier[node] != _SERIES_TIER or tree.distance[node] >= WEAK_SERIES_LINK)
            ]
            if not weak:
                break  # the audit warns about the proportions this leaves
            widest = max(weak, key=lambda k: tree.counts[groups[k], c])
            groups.extend(tree.children[groups.pop(widest)].tolist())
            links_cut += 1
    group_of_atom = np.empty(len(tree.children), dtype=np.int64)
    for group, node in enumerate(groups):
        group_of_atom[list(tree.leaves(node))] = group
    kept = set(groups)
    return _Cut(group_of_atom[tree.atom_of], links_cut, sum(top not in kept for top in tree.tops))


def _similar_pairs(scan: DatasetScan, config: SplitConfig) -> tuple[_Links, _Links]:
    """(near duplicates by perceptual hash, same-series neighbours) of different bytes and one label.

    A look-alike filed under another class cannot hand the model the answer to a validation
    image, and at 16x16 or 256 bits every abdominal slice looks alike: links across labels would
    only chain the look-alike patients of all classes into one group.
    """
    items = scan.items
    hash_links = series_links = _Links.empty()
    if config.near_dup_distance is not None and all(item.phash for item in items):
        hashes = [item.phash for item in items]
        pairs = near_duplicate_pairs(hashes, config.near_dup_distance)
        distance = _scaled(_hash_distances(hashes, pairs), config.near_dup_distance)
        hash_links = _Links.of(pairs, distance, _HASH_TIER)
    if config.series_distance is not None:
        series_links = series_pairs(scan, config.series_distance)
    label = np.unique([item.label for item in items], return_inverse=True)[1]
    content = np.unique([item.sha256 for item in items], return_inverse=True)[1]

    def kept(links: _Links) -> _Links:
        first, second = links.pairs[:, 0], links.pairs[:, 1]
        return links.where((label[first] == label[second]) & (content[first] != content[second]))

    return kept(hash_links), kept(series_links)


def series_pairs(scan: DatasetScan, max_difference: float) -> _Links:
    """Pairs of files of one class numbered next to each other (``Cyst- (12)`` / ``Cyst- (13)``,
    or one number apart) whose 16x16 thumbnails differ by at most ``max_difference`` (mean
    absolute difference after normalising each to zero mean, unit std).

    Scanners and the Kaggle dataset number the slices of one patient consecutively. Adjacent
    slices can be further apart in perceptual-hash bits than the global near-duplicate distance
    (hash bits near the median flip under a one-pixel shift), while a thumbnail comparison is
    stable; restricting it to neighbouring numbers keeps unrelated look-alikes apart. A series
    is one label's files with one name pattern.
    """
    series: dict[tuple[str, str, str], list[tuple[int, int]]] = defaultdict(list)
    for index, item in enumerate(scan.items):
        match = _NUMBERED.match(_relative(item.path, scan.root))
        if match and item.thumbnail:
            series[(item.label, match.group(1), match.group(3))].append((int(match.group(2)), index))
    candidates = []
    for members in series.values():
        members.sort()
        for k, (number, i) in enumerate(members):
            for other_number, j in members[k + 1 : k + 3]:  # next two numbers: skips one interloper
                if other_number - number <= 2:
                    candidates.append((min(i, j), max(i, j)))
    pairs = np.array(candidates, dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        return _Links.empty()
    thumbs = _normalised_thumbnails(scan.items)
    difference = np.abs(thumbs[pairs[:, 0]] - thumbs[pairs[:, 1]]).mean(axis=1)
    keep = difference <= max_difference
    return _Links.of(pairs[keep], _scaled(difference[keep], max_difference), _SERIES_TIER)


_NUMBERED = re.compile(r"^(.*?)(\d+)(\D*)$")


def _normalised_thumbnails(items: Sequence[ScannedImage]) -> np.ndarray:
    """(N, 256) float32 thumbnails with zero mean and unit std each (zeros where missing)."""
    raw = np.zeros((len(items), 256), dtype=np.float32)
    for index, item in enumerate(items):
        if len(item.thumbnail) == 256:
            raw[index] = np.frombuffer(item.thumbnail, np.uint8)
    raw -= raw.mean(axis=1, keepdims=True)
    raw /= raw.std(axis=1, keepdims=True) + 1e-6
    return raw


def _apply_pattern(scan: DatasetScan, pattern: str, uf: _UnionFind) -> int:
    """Union files whose path (relative to the dataset folder) gives the same pattern key."""
    regex = re.compile(pattern)
    first_with_key: dict[str, int] = {}
    for index, item in enumerate(scan.items):
        match = regex.search(_relative(item.path, scan.root))
        if match is None:
            continue
        key = match.group(1) if regex.groups else match.group(0)
        if key in first_with_key:
            uf.union(first_with_key[key], index)
        else:
            first_with_key[key] = index
    if not first_with_key:
        log.warning("--group-pattern %r matched no file path; no patient groups formed", pattern)
    return len(first_with_key)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
