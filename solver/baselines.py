"""Baselines: one group size for the whole batch (static), and the best single size per batch.

`static_packing(table, N, d, fill)` is the `static` planner's packing
(`solver.static.static_bins`, same budget) as costed loads. `BatchAdaptivePlanner` tries
every allowed size that holds the longest sequence and keeps the fastest.
"""

from __future__ import annotations

from typing import Any

from .costed import CostedPlanner
from .pack import GroupLoad, MicroBatchLoad, plan_cost
from .static import static_bins
from .table import CostTable


def static_packing(table: CostTable, num_ranks: int, d: int, fill: float = 1.0) -> list[MicroBatchLoad] | None:
    """The static planner's packing with group size d (FlexSP's static baseline with fill 0.9),
    costed; None if the longest sequence does not fit d ranks."""
    lengths = table.lengths
    if max(lengths) > table.cap[d]:
        return None
    mbs = []
    for chunk in static_bins(lengths, num_ranks, d, table.cap[d], fill):
        mb = MicroBatchLoad([], num_ranks)
        for b in chunk:
            mb.groups.append(
                GroupLoad(d, table.overhead[d] + sum(table.time[i][d] for i in b), sum(lengths[i] for i in b), list(b))
            )
            mb.free -= d
        mbs.append(mb)
    return mbs


def best_single_degree(table: CostTable, num_ranks: int, fill: float = 1.0) -> tuple[int, list[MicroBatchLoad]]:
    """The allowed size whose static packing of this batch is fastest."""
    best = None
    for d in table.degrees:
        if d > num_ranks:
            continue
        mbs = static_packing(table, num_ranks, d, fill)
        if mbs is None:
            continue
        c = plan_cost(mbs, table.fixed)
        if best is None or c < best[0]:
            best = (c, d, mbs)
    if best is None:
        raise ValueError(f"the longest sequence ({max(table.lengths)} tokens) fits no allowed group size")
    return best[1], best[2]


class BatchAdaptivePlanner(CostedPlanner):
    """Best single group size per batch (planner.options["fill"], default 1.0, scales the token budget)."""

    name = "batch_adaptive"

    def _solve(self, table: CostTable, num_ranks: int) -> tuple[list[MicroBatchLoad], str, dict[str, Any]]:
        d, mbs = best_single_degree(table, num_ranks, float(self.cfg.options.get("fill", 1.0)))
        return mbs, "heuristic", {"group_size": d}
