"""The fast heuristic: scan makespan targets and micro-batch counts, pack greedily, improve locally.

`heuristic_pack(table, num_ranks, time_budget)` returns the best packing found
(`MicroBatchLoad` lists); every planner beyond `static`/`random` starts here.
"""

from __future__ import annotations

import math
import time

from .local_search import LocalSearch
from .pack import INF, MicroBatchLoad, pack_target, plan_cost, sequential_pack
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
    num_targets: int = 24,
    keep: int = 3,
) -> list[MicroBatchLoad]:
    """Best packing of all of `table`'s sequences found within about `time_budget` seconds.

    Candidates: a target-makespan scan with an open number of micro-batches
    and with M_min and M_min + 1 micro-batches (overflowing into the least
    loaded group when full), plus the sequential fill; the `keep` best are
    improved by local search. Raises ValueError when a sequence fits no group.
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
    lo = max(slowest * 0.25, work / (m_min + 4), 1e-12)
    hi = max(work * 1.5, slowest) * 1.01
    targets = [lo * (hi / lo) ** (k / max(1, num_targets - 1)) for k in range(num_targets)]
    # Most promising first (a time budget may stop the scan): near the fluid makespan of M_min micro-batches.
    centre = max(work / m_min, slowest)
    targets.sort(key=lambda c: abs(math.log(c / centre)))
    cands: list[tuple[float, list[MicroBatchLoad]]] = []
    combos = [(c, cap, by_memory) for c in targets for by_memory in (True, False) for cap in (m_min, None, m_min + 1)]
    for c, cap, by_memory in combos:
        if time.perf_counter() - t0 > time_budget * 0.4 and cands:
            break
        mbs = pack_target(
            order, table, num_ranks, c, max_micro_batches=cap, overflow=True, presorted=True, by_memory=by_memory
        )
        if mbs is not None:
            cands.append((plan_cost(mbs, table.fixed), mbs))
    if time.perf_counter() - t0 < time_budget * 0.3 or not cands:
        seq = sequential_pack(idx, table, num_ranks)
        if seq is not None:
            cands.append((plan_cost(seq, table.fixed), seq))
    if not cands:
        raise ValueError("no packing found: some sequence fits no allowed group size within the ranks")
    cands.sort(key=lambda x: x[0])
    best_cost, best = cands[0]
    chosen = cands[:keep]
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
