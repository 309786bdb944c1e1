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


def order_longest_first(idx: list[int], table: CostTable) -> list[int]:
    return sorted(idx, key=lambda i: (-table.lengths[i], i))


def pack_target(
    idx: list[int],
    table: CostTable,
    num_ranks: int,
    target: float,
    max_micro_batches: int | None = None,
    presorted: bool = False,
    overflow: bool = False,
) -> list[MicroBatchLoad] | None:
    """Pack sequences `idx` aiming at makespan `target` per micro-batch.

    Returns the micro-batches, or None when `max_micro_batches` would be
    exceeded (with `overflow`, the least loaded open group that has memory
    for it takes the sequence instead) or a sequence fits no allowed degree
    within `num_ranks`.
    A sequence slower than `target` at every degree gets its own group at
    its fastest degree (its micro-batch then runs longer than the target).
    """
    order = idx if presorted else order_longest_first(idx, table)
    degrees = [d for d in table.degrees if d <= num_ranks]
    mbs: list[MicroBatchLoad] = []
    # Open groups by degree, each list sorted by load so the best fit is a bisect away.
    by_degree: dict[int, list[tuple[float, int, GroupLoad]]] = {}
    counter = 0
    for i in order:
        s = table.lengths[i]
        row = table.time[i]
        placed = False
        best: tuple[float, int, int] | None = None  # (leftover time, degree, position)
        for d, lst in by_degree.items():
            t = row[d]
            if t == INF or not lst:
                continue
            # Groups with load <= target - t can take it; the fullest of them fits best.
            k = bisect.bisect_right(lst, (target - t, math.inf)) - 1
            scanned = 0
            while k >= 0 and scanned < 8:
                g = lst[k][2]
                if g.tokens + s <= table.cap[d]:
                    left = target - (g.load + t)
                    if best is None or left < best[0]:
                        best = (left, d, k)
                    break
                k -= 1
                scanned += 1
        if best is not None:
            _, d, k = best
            lst = by_degree[d]
            _, _, g = lst.pop(k)
            g.load += row[d]
            g.tokens += s
            g.seqs.append(i)
            counter += 1
            bisect.insort(lst, (g.load, counter, g))
            placed = True
        if placed:
            continue
        # New group: the smallest degree meeting the target, else the fastest degree.
        d_new = None
        for d in degrees:
            if row[d] != INF and table.overhead[d] + row[d] <= target:
                d_new = d
                break
        if d_new is None:
            feas = [d for d in degrees if row[d] != INF]
            if not feas:
                return None
            d_new = min(feas, key=lambda d: (table.overhead[d] + row[d], d))
        host = None
        for mb in mbs:
            if mb.free >= d_new and (host is None or mb.free < host.free):
                host = mb
        if host is None and max_micro_batches is not None and len(mbs) >= max_micro_batches:
            if not overflow:
                return None
            # Every micro-batch is full: the open group whose load grows least takes it.
            cand = None
            for d, lst in by_degree.items():
                t = row[d]
                if t == INF:
                    continue
                for k, (load, _, g) in enumerate(lst):
                    if g.tokens + s <= table.cap[d] and (cand is None or load + t < cand[0]):
                        cand = (load + t, d, k)
                        break  # lists are sorted by load: the first that fits is the least loaded
            if cand is None:
                return None
            _, d, k = cand
            lst = by_degree[d]
            _, _, g = lst.pop(k)
            g.load += row[d]
            g.tokens += s
            g.seqs.append(i)
            counter += 1
            bisect.insort(lst, (g.load, counter, g))
            continue
        if host is None:
            host = MicroBatchLoad([], num_ranks)
            mbs.append(host)
        g = GroupLoad(d_new, table.overhead[d_new] + row[d_new], s, [i])
        host.groups.append(g)
        host.free -= d_new
        counter += 1
        bisect.insort(by_degree.setdefault(d_new, []), (g.load, counter, g))
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
    by_degree: dict[int, list[tuple[float, int, GroupLoad]]] = {}
    counter = 0
    for i in order:
        s = table.lengths[i]
        row = table.time[i]
        best = None
        for d, lst in by_degree.items():
            t = row[d]
            if t == INF or not lst:
                continue
            k = bisect.bisect_right(lst, (target - t, math.inf)) - 1
            scanned = 0
            while k >= 0 and scanned < 8:
                g = lst[k][2]
                if g.tokens + s <= table.cap[d]:
                    slack = target - (g.load + t)
                    if best is None or slack < best[0]:
                        best = (slack, d, k)
                    break
                k -= 1
                scanned += 1
        if best is not None:
            _, d, k = best
            lst = by_degree[d]
            _, _, g = lst.pop(k)
            g.load += row[d]
            g.tokens += s
            g.seqs.append(i)
            counter += 1
            bisect.insort(lst, (g.load, counter, g))
            continue
        d_new = None
        for d in degrees:
            if d > mb.free:
                break
            if row[d] != INF and table.overhead[d] + row[d] <= target:
                d_new = d
                break
        if d_new is None:
            left.append(i)
            continue
        g = GroupLoad(d_new, table.overhead[d_new] + row[d_new], s, [i])
        mb.groups.append(g)
        mb.free -= d_new
        counter += 1
        bisect.insort(by_degree.setdefault(d_new, []), (g.load, counter, g))
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
