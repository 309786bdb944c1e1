"""Greedy packing of sequences into groups and micro-batches under a makespan target.

The building block of the heuristics: given a target micro-batch makespan
`C`, sequences (longest first) go into the open group where they fit best
(time and memory), else into a new group of the smallest allowed degree that
meets the target, placed in the micro-batch with the fewest free ranks that
can take it, else into a new micro-batch. Scanning `C` trades the number of
micro-batches (fixed costs, memory) against their length.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field

from .table import CostTable

INF = float("inf")


@dataclass
class GroupLoad:
    """One group while packing: its degree, time (overhead included), tokens and sequence indices."""

    d: int
    load: float
    tokens: int
    seqs: list[int] = field(default_factory=list)


@dataclass
class MicroBatchLoad:
    groups: list[GroupLoad] = field(default_factory=list)
    free: int = 0  # ranks in no group

    def makespan(self) -> float:
        return max((g.load for g in self.groups if g.seqs), default=0.0)


def plan_cost(mbs: list[MicroBatchLoad], fixed: float) -> float:
    """Sum over non-empty micro-batches of fixed + makespan (additive cost models)."""
    return sum(fixed + mb.makespan() for mb in mbs if any(g.seqs for g in mb.groups))


class GroupIndex:
    """Open groups of one degree, searchable by load (time) and by free memory.

    `find(t, s, target)` returns a group that can take a sequence adding `t`
    seconds and `s` tokens without passing `target` or its capacity, preferring
    the fullest in time (best fit), else the fullest in memory; or None.
    """

    SCAN = 8

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.by_load: list[tuple[float, int]] = []
        self.by_free: list[tuple[int, int]] = []
        self.groups: dict[int, GroupLoad] = {}

    def add(self, g: GroupLoad) -> None:
        k = id(g)
        self.groups[k] = g
        bisect.insort(self.by_load, (g.load, k))
        bisect.insort(self.by_free, (self.cap - g.tokens, k))

    def _drop(self, g: GroupLoad) -> None:
        k = id(g)
        i = bisect.bisect_left(self.by_load, (g.load, k))
        del self.by_load[i]
        i = bisect.bisect_left(self.by_free, (self.cap - g.tokens, k))
        del self.by_free[i]

    def put(self, g: GroupLoad, i: int, t: float, s: int) -> None:
        """Add sequence i (t seconds, s tokens) to group g of this index."""
        self._drop(g)
        g.load += t
        g.tokens += s
        g.seqs.append(i)
        bisect.insort(self.by_load, (g.load, id(g)))
        bisect.insort(self.by_free, (self.cap - g.tokens, id(g)))

    def find(self, t: float, s: int, target: float, by_memory: bool = True) -> GroupLoad | None:
        if not self.by_load or self.by_load[0][0] + t > target or self.by_free[-1][0] < s:
            return None  # every group is too slow already, or none has the memory
        k = bisect.bisect_right(self.by_load, (target - t, math.inf)) - 1
        for j in range(k, max(-1, k - self.SCAN), -1):
            g = self.groups[self.by_load[j][1]]
            if g.tokens + s <= self.cap:
                return g
        if not by_memory:
            return None
        k = bisect.bisect_left(self.by_free, (s, -1))
        for j in range(k, min(len(self.by_free), k + self.SCAN)):
            g = self.groups[self.by_free[j][1]]
            if g.load + t <= target:
                return g
        return None

    def least_loaded_fitting(self, s: int) -> GroupLoad | None:
        """The least loaded group with room for s tokens (scans by load)."""
        if not self.by_free or self.by_free[-1][0] < s:
            return None
        for load, k in self.by_load:
            g = self.groups[k]
            if g.tokens + s <= self.cap:
                return g
        return None


def order_longest_first(idx: list[int], table: CostTable) -> list[int]:
    return sorted(idx, key=lambda i: (-table.lengths[i], i))


def _best_open(
    indexes: dict[int, GroupIndex], row: dict[int, float], s: int, target: float, by_memory: bool = True
) -> tuple[int, GroupLoad] | None:
    """The open group (any degree) that takes the sequence with the least time left before `target`."""
    best = None
    for d, ix in indexes.items():
        t = row[d]
        if t == INF:
            continue
        g = ix.find(t, s, target, by_memory)
        if g is not None:
            slack = target - (g.load + t)
            if best is None or slack < best[0]:
                best = (slack, d, g)
    return None if best is None else (best[1], best[2])


def _new_degree(degrees: list[int], table: CostTable, row: dict[int, float], target: float, free: int) -> int | None:
    """Smallest degree (at most `free`) whose group alone meets `target` for this sequence."""
    for d in degrees:
        if d > free:
            break
        if row[d] != INF and table.overhead[d] + row[d] <= target:
            return d
    return None


def pack_target(
    idx: list[int],
    table: CostTable,
    num_ranks: int,
    target: float,
    max_micro_batches: int | None = None,
    presorted: bool = False,
    overflow: bool = False,
    by_memory: bool = True,
) -> list[MicroBatchLoad] | None:
    """Pack sequences `idx` aiming at makespan `target` per micro-batch.

    Returns the micro-batches, or None when `max_micro_batches` would be
    exceeded (with `overflow`, the least loaded open group that has memory
    for it takes the sequence instead) or a sequence fits no allowed degree
    within `num_ranks`. A sequence slower than `target` at every degree gets
    its own group at its fastest degree (its micro-batch then runs longer).
    `by_memory`: when no group near the best time fit has memory, also look
    for one by free memory before opening a new group (fewer, fuller groups).
    """
    order = idx if presorted else order_longest_first(idx, table)
    degrees = [d for d in table.degrees if d <= num_ranks]
    mbs: list[MicroBatchLoad] = []
    free_ranks: list[tuple[int, int]] = []  # (free ranks, micro-batch index), sorted
    indexes: dict[int, GroupIndex] = {}
    for i in order:
        s = table.lengths[i]
        row = table.time[i]
        hit = _best_open(indexes, row, s, target, by_memory)
        if hit is not None:
            d, g = hit
            indexes[d].put(g, i, row[d], s)
            continue
        d_new = _new_degree(degrees, table, row, target, num_ranks)
        if d_new is None:
            feas = [d for d in degrees if row[d] != INF]
            if not feas:
                return None
            d_new = min(feas, key=lambda d: (table.overhead[d] + row[d], d))
        # the micro-batch with the fewest free ranks that still holds d_new ranks
        k = bisect.bisect_left(free_ranks, (d_new, -1))
        host = mbs[free_ranks[k][1]] if k < len(free_ranks) else None
        if host is None and max_micro_batches is not None and len(mbs) >= max_micro_batches:
            if not overflow:
                return None
            # Every micro-batch is full: the open group whose load grows least takes it.
            cand = None
            for d, ix in indexes.items():
                if row[d] == INF:
                    continue
                g = ix.least_loaded_fitting(s)
                if g is not None and (cand is None or g.load + row[d] < cand[0]):
                    cand = (g.load + row[d], d, g)
            if cand is None:
                return None
            indexes[cand[1]].put(cand[2], i, row[cand[1]], s)
            continue
        if host is None:
            host = MicroBatchLoad([], num_ranks)
            mbs.append(host)
            k = len(mbs) - 1
        else:
            k = free_ranks.pop(k)[1]
        g = GroupLoad(d_new, table.overhead[d_new] + row[d_new], s, [i])
        host.groups.append(g)
        host.free -= d_new
        if host.free > 0:
            bisect.insort(free_ranks, (host.free, k))
        if d_new not in indexes:
            indexes[d_new] = GroupIndex(table.cap[d_new])
        indexes[d_new].add(g)
    return mbs


def fill_micro_batch(
    order: list[int], table: CostTable, num_ranks: int, target: float
) -> tuple[MicroBatchLoad, list[int]]:
    """Fill one micro-batch with makespan at most `target`, taking sequences in `order`.

    A sequence goes into the open group it fits best (time and memory), else
    into a new group of the smallest allowed degree meeting the target if
    ranks are free, else it is left over. Returns the micro-batch and the
    left-over sequences (in `order`'s order).
    """
    degrees = [d for d in table.degrees if d <= num_ranks]
    mb = MicroBatchLoad([], num_ranks)
    left: list[int] = []
    indexes: dict[int, GroupIndex] = {}
    for i in order:
        s = table.lengths[i]
        row = table.time[i]
        hit = _best_open(indexes, row, s, target)
        if hit is not None:
            d, g = hit
            indexes[d].put(g, i, row[d], s)
            continue
        d_new = _new_degree(degrees, table, row, target, mb.free)
        if d_new is None:
            left.append(i)
            continue
        g = GroupLoad(d_new, table.overhead[d_new] + row[d_new], s, [i])
        mb.groups.append(g)
        mb.free -= d_new
        if d_new not in indexes:
            indexes[d_new] = GroupIndex(table.cap[d_new])
        indexes[d_new].add(g)
    return mb, left


def rest_bound(idx: list[int], table: CostTable, num_ranks: int) -> float:
    """A lower bound on the time of sequences `idx` alone: fluid rank-time plus fixed costs."""
    if not idx:
        return 0.0
    work = sum(table.min_rank_time(i) for i in idx) / num_ranks
    tokens = sum(table.lengths[i] for i in idx)
    cap = max(table.cap[d] // d for d in table.degrees if d <= num_ranks) * num_ranks
    slowest = max(table.min_time(i) for i in idx)
    return max(work, slowest) + math.ceil(tokens / cap) * table.fixed


def sequential_pack(
    idx: list[int], table: CostTable, num_ranks: int, num_targets: int = 12
) -> list[MicroBatchLoad] | None:
    """Build micro-batches one at a time, each with the makespan that looks best.

    For each new micro-batch, candidate makespans run from the fastest time
    of the longest remaining sequence up to the makespan that takes all of
    them; each is scored by its own time plus `rest_bound` of what it leaves.
    Returns None when some sequence fits no allowed degree.
    """
    order = order_longest_first(idx, table)
    mbs: list[MicroBatchLoad] = []
    while order:
        lo = table.min_time(order[0])
        if lo == INF:
            return None
        work = sum(table.min_rank_time(i) for i in order) / num_ranks
        hi = max(lo, work) * 3.0 + 1e-9
        cands = sorted({lo * (hi / lo) ** (k / max(1, num_targets - 1)) for k in range(num_targets)} | {lo})
        best = None
        for c in cands:
            mb, left = fill_micro_batch(order, table, num_ranks, c * (1 + 1e-12))
            if not mb.groups:
                continue
            score = table.fixed + mb.makespan() + rest_bound(left, table, num_ranks)
            if best is None or score < best[0]:
                best = (score, mb, left)
            if not left:
                break
        if best is None:
            return None
        mbs.append(best[1])
        order = best[2]
    return mbs


def repack_micro_batch(
    mb: MicroBatchLoad, table: CostTable, num_ranks: int, iters: int = 7, deadline: float = math.inf
) -> MicroBatchLoad:
    """The micro-batch's sequences packed again at the least makespan a bisection finds (never worse).

    Skipped when the makespan is already within 3% of the micro-batch's fluid bound; stops
    at `deadline` (a `time.perf_counter()` value) with the best packing so far.
    """
    seqs = [i for g in mb.groups for i in g.seqs]
    if not seqs:
        return mb
    span = mb.makespan()
    lo = max(max(table.min_time(i) for i in seqs), sum(table.min_rank_time(i) for i in seqs) / num_ranks)
    best = mb
    hi = span
    if lo >= hi / 1.03:
        return mb
    order = order_longest_first(seqs, table)
    # a first probe just above the bound narrows a wide bracket quickly
    probe = min(hi, lo * 1.15)
    cand, left = fill_micro_batch(order, table, num_ranks, probe)
    if not left:
        hi = probe
        if cand.makespan() < best.makespan():
            best = cand
    else:
        lo = probe
    for _ in range(iters):
        if time.perf_counter() > deadline:
            break
        mid = (lo + hi) / 2
        cand, left = fill_micro_batch(order, table, num_ranks, mid)
        if left:
            lo = mid
        else:
            hi = mid
            if cand.makespan() < best.makespan():
                best = cand
        if hi - lo < 1e-3 * hi:
            break
    return best


def optimistic_cost(mbs: list[MicroBatchLoad], table: CostTable, num_ranks: int) -> float:
    """An estimate of `mbs` after repacking each micro-batch: its fluid work, or its slowest sequence
    at the group size it has now."""
    total = 0.0
    for mb in mbs:
        seqs = [i for g in mb.groups for i in g.seqs]
        if not seqs:
            continue
        work = sum(table.min_rank_time(i) for i in seqs) / num_ranks
        # the slowest sequence at the size it has now: repacking keeps the large groups' choices
        slow = max(table.overhead[g.d] + table.time[i][g.d] for g in mb.groups for i in g.seqs)
        total += table.fixed + min(mb.makespan(), max(work, slow))
    return total
