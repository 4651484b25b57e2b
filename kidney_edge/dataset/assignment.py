"""Assignment of groups to train/val/test: per split and class targets, a greedy deal by
group size, local moves and swaps, and an exact deal by subset sums for a class still off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Reachable:
    """Which (val, test) image counts some choice of groups adds up to, and one such choice each."""

    reach: np.ndarray  # (V+1, T+1) bool: reach[v, t] when groups sum to v in val and t in test
    last: np.ndarray  # (V+1, T+1) int64: index of the last group of the first choice found; -1: none
    into_val: np.ndarray  # (V+1, T+1) bool: that group went to val (else to test)

    def choice(self, v: int, t: int, sizes: np.ndarray) -> tuple[list[int], list[int]]:
        """(groups in val, groups in test) adding up to ``reach[v, t]``."""
        val, test = [], []
        while v or t:  # each step goes back to a cell reached before that group was considered
            k = int(self.last[v, t])
            if self.into_val[v, t]:
                val.append(k)
                v -= int(sizes[k])
            else:
                test.append(k)
                t -= int(sizes[k])
        return val, test


def _reachable(sizes: np.ndarray, top_val: int, top_test: int) -> _Reachable:
    """Subset sums by dynamic programming over groups of ``sizes`` images, each to val, test or
    neither (train), up to ``top_val`` and ``top_test`` images."""
    reach = np.zeros((top_val + 1, top_test + 1), dtype=bool)
    reach[0, 0] = True
    last = np.full(reach.shape, -1, dtype=np.int64)
    into_val = np.zeros(reach.shape, dtype=bool)
    for k, size in enumerate(sizes.tolist()):
        if size <= 0:
            continue
        before = reach.copy()  # each group is used once
        for axis, top in ((0, top_val), (1, top_test)):
            if size > top:
                continue
            shifted = np.zeros_like(before)
            if axis == 0:
                shifted[size:] = before[: top + 1 - size]
            else:
                shifted[:, size:] = before[:, : top + 1 - size]
            new = shifted & ~reach
            last[new], into_val[new] = k, axis == 0
            reach |= new
    return _Reachable(reach, last, into_val)


def can_split(sizes: np.ndarray, low: np.ndarray, high: np.ndarray) -> bool:
    """Whether groups of ``sizes`` images can be dealt so that train, val and test each hold
    between ``low`` and ``high`` (3,) of them."""
    if high[1] < 0 or high[2] < 0:
        return False
    held = np.zeros(3)  # a greedy deal first, largest group to the split furthest below its middle
    for size in np.sort(sizes)[::-1]:
        held[np.argmax((low + high) / 2 - held)] += size
    if ((held >= low) & (held <= high)).all():
        return True  # enough on large data, where the exact search below would take seconds
    found = _reachable(sizes, int(high[1]), int(high[2])).reach
    val, test = np.indices(found.shape)
    train = sizes.sum() - val - test
    return bool((found & (val >= low[1]) & (test >= low[2]) & (train >= low[0]) & (train <= high[0])).any())


# A val/test image missing below a class's floor costs this many times a proportion error of one
# image: with fewer than a handful of images of a class, its recall on that split is noise.
_SHORTFALL_WEIGHT = 10.0


def _penalty(images: np.ndarray, target: np.ndarray, floor: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Squared error of holding ``images`` instead of ``target``, plus the weighted squared
    shortfall below ``floor``, both as shares of the class's ``total`` (broadcasting)."""
    error = (images - target) / total
    shortfall = np.maximum(floor - images, 0) / total
    return error**2 + _SHORTFALL_WEIGHT * shortfall**2


@dataclass(frozen=True)
class Targets:
    """What the grouped split aims at, per split and class, and how far off a split is."""

    target: np.ndarray  # (3, C) images wanted per split and class
    floor: np.ndarray  # (3, C) fewest wanted: min(min_eval_images, target) for val/test, 0 for train
    slack: np.ndarray  # (C,) images a split may hold above or below its target: the tolerance, >= 1
    low: np.ndarray  # (3, C) fewest accepted: target - slack, and not below the floor
    high: np.ndarray  # (3, C) most accepted: target + slack
    totals: np.ndarray  # (C,) images per class (at least 1)
    closed: np.ndarray  # (3,) bool: splits with ratio 0 take no group

    @staticmethod
    def of(
        class_sizes: np.ndarray, ratios: Sequence[float], min_eval_images: int, tolerance: float
    ) -> Targets:
        """Targets for classes of ``class_sizes`` images under the split ``ratios``."""
        totals = np.maximum(class_sizes, 1)
        target = np.outer(ratios, totals)
        floor = np.minimum(target, min_eval_images)
        floor[0] = 0  # train holds most of every class anyway
        slack = np.maximum(tolerance * totals, 1.0)  # never tighter than one image
        closed = np.array([r <= 0 for r in ratios])
        low, high = np.maximum(target - slack, floor), target + slack
        low[closed], high[closed] = 0, 0
        return Targets(target, floor, slack, low, high, totals, closed)

    def cost(self, rows: np.ndarray, s: int) -> np.ndarray:
        """Cost of split ``s`` holding ``rows`` (..., C) images: :func:`_penalty` summed over classes."""
        return _penalty(rows, self.target[s], self.floor[s], self.totals).sum(axis=-1)

    def class_cost(self, c: int, held: Sequence[np.ndarray]) -> np.ndarray:
        """Cost of class ``c`` alone, ``held[s]`` images of it in split s: summed over splits."""
        return sum(
            _penalty(images, self.target[s, c], self.floor[s, c], self.totals[c])
            for s, images in enumerate(held)
        )

    def missed(self, current: np.ndarray) -> list[int]:
        """Classes some split holds fewer than ``low`` or more than ``high`` images of."""
        outside = (current < self.low - 1e-9) | (current > self.high + 1e-9)
        return np.nonzero(outside[~self.closed].any(axis=0))[0].tolist()

    def off_ratio(self, current: np.ndarray) -> list[int]:
        """Classes some split holds more than ``slack`` images away from its target of."""
        return np.nonzero((np.abs(current - self.target) > self.slack + 1e-9).any(axis=0))[0].tolist()


def assign_grouped(group_of: np.ndarray, class_index: np.ndarray, targets: Targets, seed: int) -> np.ndarray:
    """Split index per group: largest groups first, each to the split that most lacks its classes;
    then local moves and swaps while they lower the cost; then an exact deal of the groups of any
    class still outside its tolerance."""
    counts = np.zeros((group_of.max() + 1, len(targets.totals)))
    np.add.at(counts, (group_of, class_index), 1)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(counts))  # seeded order among groups of equal size
    order = perm[np.argsort(-counts.sum(axis=1)[perm], kind="stable")]
    current = np.zeros_like(targets.target)
    split_of = np.empty(len(counts), dtype=np.int64)
    for g in order:
        score = ((targets.target - current) / targets.totals) @ counts[g]
        score[targets.closed] = -np.inf
        s = int(np.argmax(score))
        split_of[g] = s
        current[s] += counts[g]
    _improve(split_of, counts, current, targets, rng)
    for c in targets.missed(current):
        _deal_class(c, split_of, counts, current, targets, rng)
    return split_of


def _deal_class(
    c: int,
    split_of: np.ndarray,
    counts: np.ndarray,
    current: np.ndarray,
    targets: Targets,
    rng: np.random.Generator,
) -> None:
    """Re-deal the groups holding only class ``c`` to the cheapest (val, test) counts within its
    tolerance, found exactly by :func:`_reachable`; single moves and swaps miss deals that need
    one large group to change places with two small ones."""
    own = rng.permutation(np.nonzero((counts[:, c] > 0) & (counts.sum(axis=1) == counts[:, c]))[0])
    if not len(own):
        return
    sizes = counts[own, c].astype(np.int64)
    fixed = current[:, c] - np.array([sizes[split_of[own] == s].sum() for s in range(3)])
    top_val, top_test = (int(targets.high[s, c] - fixed[s]) for s in (1, 2))
    if top_val < 0 or top_test < 0:
        return
    found = _reachable(sizes, top_val, top_test)
    val, test = np.indices(found.reach.shape)
    held = (fixed[0] + sizes.sum() - val - test, fixed[1] + val, fixed[2] + test)
    cost = np.where(found.reach, targets.class_cost(c, held), np.inf)
    v, t = np.unravel_index(int(np.argmin(cost)), cost.shape)
    if cost[v, t] >= targets.class_cost(c, current[:, c]) - 1e-12:
        return
    into_val, into_test = found.choice(int(v), int(t), sizes)
    split_of[own] = 0
    split_of[own[into_val]], split_of[own[into_test]] = 1, 2
    current[:, c] = fixed + [sizes.sum() - v - t, v, t]


def _improve(
    split_of: np.ndarray,
    counts: np.ndarray,
    current: np.ndarray,
    targets: Targets,
    rng: np.random.Generator,
    passes: int = 4,
) -> None:
    """Move single groups between splits while that lowers the cost, then try swaps."""
    for _ in range(passes):
        if np.abs(current - targets.target).max() <= 1.0:
            break  # every split/class count is within one image of its target: rounding level
        moved = False
        for g in rng.permutation(len(counts)):
            s = split_of[g]
            for t in range(len(targets.target)):
                if t == s or targets.closed[t]:
                    continue
                before = targets.cost(current[s], s) + targets.cost(current[t], t)
                after = targets.cost(current[s] - counts[g], s) + targets.cost(current[t] + counts[g], t)
                if after < before - 1e-12:
                    current[s] -= counts[g]
                    current[t] += counts[g]
                    split_of[g], s, moved = t, t, True
        moved |= _swap_pass(split_of, counts, current, targets, rng)
        if not moved:
            break


def _swap_pass(
    split_of: np.ndarray,
    counts: np.ndarray,
    current: np.ndarray,
    targets: Targets,
    rng: np.random.Generator,
) -> bool:
    """Exchange two groups of different splits when that lowers the cost (vectorised over partners)."""
    swapped = False
    for g in rng.permutation(len(counts)):
        s = split_of[g]
        for t in range(len(targets.target)):
            partners = np.nonzero(split_of == t)[0]
            if t == s or targets.closed[t] or not len(partners):
                continue
            before = targets.cost(current[s], s) + targets.cost(current[t], t)
            moved = counts[partners] - counts[g]  # (H, C) what s gains and t loses
            after = targets.cost(current[s] + moved, s) + targets.cost(current[t] - moved, t)
            best = int(np.argmin(after))
            if after[best] < before - 1e-12:
                h = partners[best]
                current[s] += moved[best]
                current[t] -= moved[best]
                split_of[g], split_of[h], s, swapped = t, s, t, True
    return swapped


def assign_random(class_index: np.ndarray, n_classes: int, ratios: Sequence[float], seed: int) -> np.ndarray:
    """Per-image stratified split that ignores groups: only to show the leak it makes."""
    rng = np.random.default_rng(seed)
    split_of = np.empty(len(class_index), dtype=np.int64)
    for c in range(n_classes):
        members = rng.permutation(np.nonzero(class_index == c)[0])
        cuts = np.round(np.cumsum(ratios)[:-1] * len(members)).astype(int)
        for s, part in enumerate(np.split(members, cuts)):
            split_of[part] = s
    return split_of
