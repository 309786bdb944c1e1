"""The `static` planner: one group size for every sequence (DeepSpeed-Ulysses / Megatron CP style).

Sequences are packed by best-fit decreasing into groups of `d` ranks with a
budget of ``cluster.tokens_per_rank * d`` tokens each (or the cost model's
capacity when ``planner.options["budget"] == "cost_model"``); ``num_ranks // d``
consecutive groups form one micro-batch on ranks [0, d), [d, 2d), ...
"""

from __future__ import annotations

from typing import Any

from hetsp.plan import Group, MicroBatch, Plan

from .base import Planner, PlanningError
from .packing import best_fit_decreasing


def static_plan(lengths: list[int], num_ranks: int, d: int, budget: int) -> Plan:
    """Pack `lengths` into groups of `d` ranks holding at most `budget` tokens each.

    A group size that does not divide `num_ranks` leaves the last
    ``num_ranks % d`` ranks idle. Bins are taken in creation order (longest first).
    """
    if not 1 <= d <= num_ranks:
        raise PlanningError(f"group size {d} must be between 1 and the {num_ranks} ranks")
    bins = best_fit_decreasing(lengths, budget)
    per_mb = num_ranks // d
    mbs = []
    for m in range(0, len(bins), per_mb):
        chunk = bins[m : m + per_mb]
        mbs.append(MicroBatch(tuple(Group(j * d, d, tuple(b)) for j, b in enumerate(chunk))))
    return Plan(tuple(lengths), tuple(mbs))


class StaticPlanner(Planner):
    """One group size `planner.group_size`; it must divide the number of ranks."""

    name = "static"

    def _group_size(self, num_ranks: int) -> int:
        d = self.cfg.group_size
        if d < 1:
            raise PlanningError(f"planner.group_size must be >= 1, got {d}")
        if d > num_ranks:
            raise PlanningError(
                f"planner.group_size = {d} is larger than the {num_ranks} ranks; use a size that divides {num_ranks}"
            )
        if num_ranks % d:
            divisors = [k for k in range(1, num_ranks + 1) if num_ranks % k == 0]
            raise PlanningError(
                f"planner.group_size = {d} does not divide the {num_ranks} ranks; use one of {divisors}"
            )
        return d

    def _budget(self, num_ranks: int, d: int) -> int:
        if self.cfg.options.get("budget") == "cost_model":
            return self.cost_model(num_ranks).capacity(d)
        tpr = self.cluster.tokens_per_rank
        if tpr < 1:
            raise PlanningError(f"cluster.tokens_per_rank must be >= 1, got {tpr}")
        return tpr * d

    def max_fit_length(self, num_ranks: int) -> int:
        return self._budget(num_ranks, self._group_size(num_ranks))

    def _plan(self, lengths: list[int], num_ranks: int) -> tuple[Plan, str, dict[str, Any]]:
        d = self._group_size(num_ranks)
        plan = static_plan(lengths, num_ranks, d, self._budget(num_ranks, d))
        return plan, "heuristic", {"group_size": d}
