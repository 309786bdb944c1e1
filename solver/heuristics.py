"""The fast heuristic: scan makespan targets and micro-batch counts, pack greedily, improve locally.

`heuristic_pack(table, num_ranks, time_budget)` returns the best packing found
(`MicroBatchLoad` lists); every planner beyond `static`/`random` starts here.
"""

from __future__ import annotations

import copy
import math
import time

from .chunking import min_max_chunks
from .local_search import LocalSearch
from .pack import INF, MicroBatchLoad, optimistic_cost, pack_target, plan_cost, repack_micro_batch, sequential_pack
from .table import CostTable


def fewest_micro_batches(table: CostTable, idx: list[int], num_ranks: int) -> int:
    """Memory bound on the number of micro-batches: total tokens over the most a micro-batch holds."""
    per_rank = max(table.cap[d] / d for d in table.degrees if d <= num_ranks)
    tokens = sum(table.lengths[i] for i in idx)
    return max(1, math.ceil(tokens / (per_rank * num_ranks) - 1e-9))


def heuristic_pack(
    table: CostTable,
    num_ranks: int,
    time_budget: float = 0.5,
    num_targets: int = 10,
    keep: int = 2,
    lo_rel: float = 0.6,
    hi_rel: float = 3.2,
) -> list[MicroBatchLoad]:
    """Best packing of all of `table`'s sequences found within about `time_budget` seconds.

    1. Splits: `pack_target` at makespan targets from 0.6x to 3.2x the fluid makespan of
       the fewest micro-batches (plus the times at which the longest sequences change
       group size), with M_min, M_min + 1 or any number of micro-batches, filling by
       time or also by memory. A high target fills the first micro-batches to memory.
    2. Each split's micro-batches are repacked to their own least makespan
       (`repack_micro_batch`), most promising splits first (`optimistic_cost`),
       plus FlexSP's contiguous min-max split of the sorted batch.
    3. The `keep` best are improved by `LocalSearch`.
    Every stage stops at its share of the budget (at least one packing always completes,
    so very large batches can overrun it). Raises ValueError when a sequence fits no group.
    """

    t0 = time.perf_counter()
    n = len(table.lengths)
    idx = list(range(n))
    for i in idx:
        if table.min_time(i) == INF:
            raise ValueError(f"sequence {i} ({table.lengths[i]} tokens) fits no allowed group size")
    order = sorted(idx, key=lambda i: (-table.lengths[i], i))
    work = sum(table.min_rank_time(i) for i in idx) / num_ranks
    slowest = max(table.min_time(i) for i in idx)
    m_min = fewest_micro_batches(table, idx, num_ranks)
    centre = max(work / m_min, slowest)
    # Targets well above the fluid makespan fill the first micro-batches to their memory;
    # repacking each micro-batch afterwards finds its own makespan (see `repack_micro_batch`).
    targets = [centre * lo_rel * (hi_rel / lo_rel) ** (k / max(1, num_targets - 1)) for k in range(num_targets)]
    targets.sort(key=lambda c: abs(math.log(c / (1.6 * centre))))  # most promising first
    # Where the longest sequences change group size the packing changes shape: try those first.
    breaks = sorted(
        {
            (table.overhead[d] + table.time[i][d]) * (1 + 1e-6)
            for i in order[:3]
            for d in table.degrees
            if d <= num_ranks and table.time[i][d] != INF
        }
    )
    breaks = [c for c in breaks if 0.5 * centre <= c <= 4 * centre]
    merged: list[float] = []
    for k in range(max(len(breaks), len(targets))):  # alternate, so a short budget sees both kinds
        merged += targets[k : k + 1] + breaks[k : k + 1]
    targets = merged
    cands: list[tuple[float, float, list[MicroBatchLoad]]] = []  # (estimate, cost, packing)
    combos = [(m_min, False), (m_min, True), (None, True), (m_min + 1, True)]
    scan_end = t0 + time_budget * 0.35
    for c in targets:
        for cap, by_memory in combos:
            if time.perf_counter() > scan_end and cands:
                break
            mbs = pack_target(
                order, table, num_ranks, c, max_micro_batches=cap, overflow=True, presorted=True, by_memory=by_memory
            )
            if mbs is not None:
                cands.append((optimistic_cost(mbs, table, num_ranks), plan_cost(mbs, table.fixed), mbs))
    if not cands:
        seq = sequential_pack(idx, table, num_ranks)
        if seq is None:
            raise ValueError("no packing found: some sequence fits no allowed group size within the ranks")
        cands.append((plan_cost(seq, table.fixed), plan_cost(seq, table.fixed), seq))
    # Repack the most promising by estimate (ties broken by their cost as packed); identical
    # micro-batches recur across candidates, so repacks are cached by content.
    cands.sort(key=lambda x: (round(x[0], 9), x[1]))
    pool = [min(cands, key=lambda x: x[1])[1:]]
    cache: dict[tuple[int, ...], MicroBatchLoad] = {}
    seen: set[frozenset] = set()
    for _, _, mbs in cands:
        if time.perf_counter() - t0 > time_budget * 0.65 and len(pool) > 1:
            break
        split = frozenset(tuple(sorted(i for g in mb.groups for i in g.seqs)) for mb in mbs)
        if split in seen:
            continue
        seen.add(split)
        out = []
        for mb in mbs:
            key = tuple(sorted(i for g in mb.groups for i in g.seqs))
            if key not in cache:
                cache[key] = repack_micro_batch(mb, table, num_ranks, deadline=t0 + time_budget * 0.8)
            out.append(copy.deepcopy(cache[key]))
        pool.append((plan_cost(out, table.fixed), out))
    # FlexSP's split: the length-sorted batch cut into M contiguous runs (min-max work), each repacked.
    per_rank = max(table.cap[d] / d for d in table.degrees if d <= num_ranks)
    weights = [table.min_rank_time(i) for i in order]
    tokens = [table.lengths[i] for i in order]
    for m in range(m_min, m_min + 3):
        if time.perf_counter() - t0 > time_budget * 0.7:
            break
        runs = min_max_chunks(weights, m, tokens, per_rank * num_ranks)
        if runs is None:
            continue
        out = []
        for a, b in runs:
            mb = pack_target(order[a:b], table, num_ranks, INF, max_micro_batches=1, overflow=True, presorted=True)
            if mb is None:
                break
            out.append(repack_micro_batch(mb[0], table, num_ranks, deadline=t0 + time_budget * 0.8))
        else:
            pool.append((plan_cost(out, table.fixed), out))
    pool.sort(key=lambda x: x[0])
    best_cost, best = pool[0]
    chosen = pool[:keep]
    left = max(0.0, time_budget - (time.perf_counter() - t0))
    for k, (_, mbs) in enumerate(chosen):
        share = left / (len(chosen) - k)
        t_start = time.perf_counter()
        ls = LocalSearch(table, num_ranks, t_start + share)
        ls.improve(mbs)
        left -= time.perf_counter() - t_start
        c = ls.cost(mbs)
        if c < best_cost:
            best_cost, best = c, mbs
    return best
