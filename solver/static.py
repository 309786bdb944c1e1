"""The `static` planner: one group size for every sequence (DeepSpeed-Ulysses / Megatron CP style).

Sequences are packed by best-fit decreasing into groups of `d` ranks with a
budget of ``max(fill x capacity(d), longest)`` tokens each, where capacity is
the planner's cost model's (the memory budget every planner uses) and fill is
``planner.options["fill"]`` (default 1; FlexSP's baseline uses 0.9);
``num_ranks // d`` consecutive groups form one micro-batch on ranks
[0, d), [d, 2d), ... `static_bins` is that algorithm, once: the training
planner, the baselines of ``hetsp-plan`` and the benchmark all use it.
"""

from __future__ import annotations

from typing import Any

from hetsp.plan import Group, MicroBatch, Plan

from .base import Planner, PlanningError
from .packing import best_fit_decreasing


def static_bins(lengths: list[int], num_ranks: int, d: int, capacity: int, fill: float = 1.0) -> list[list[list[int]]]:
    """Micro-batches of bins (lists of sequence indices): best-fit decreasing into groups of `d`
    ranks with a budget of ``max(floor(fill * capacity), longest)`` tokens, ``num_ranks // d``
    bins per micro-batch in creation order (longest first).

    A group size that does not divide `num_ranks` leaves the last ``num_ranks % d`` ranks idle.
    """
    if not 1 <= d <= num_ranks:
        raise PlanningError(f"group size {d} must be between 1 and the {num_ranks} ranks")
    if max(lengths) > capacity:
        raise PlanningError(f"a sequence of {max(lengths)} tokens does not fit a group of {d} ranks ({capacity} tokens)")
    bins = best_fit_decreasing(lengths, max(int(fill * capacity), max(lengths)))
    per_mb = num_ranks // d
    return [bins[m : m + per_mb] for m in range(0, len(bins), per_mb)]


def static_plan(lengths: list[int], num_ranks: int, d: int, capacity: int, fill: float = 1.0) -> Plan:
    """`static_bins` as a Plan: micro-batch m's bin j on ranks [j d, (j + 1) d)."""
    mbs = [MicroBatch(tuple(Group(j * d, d, tuple(b)) for j, b in enumerate(chunk)))
           for chunk in static_bins(lengths, num_ranks, d, capacity, fill)]
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

    def _capacity(self, num_ranks: int, d: int) -> int:
        if self.cfg.cost_model == "ring" and self.model is None and self.cluster.memory_per_rank_gb <= 0 \
                and getattr(self, "_fixed_cost_model", None) is None:
            # the ring model's capacity without a memory size, which needs no model shape
            cap = self.cluster.tokens_per_rank * d
        else:
            cap = self.cost_model(num_ranks).capacity(d)
        if cap < 1:
            raise PlanningError(f"no room for activations on a group of {d} ranks ({cap} tokens); add memory or ranks")
        return cap

    def max_fit_length(self, num_ranks: int) -> int:
        return self._capacity(num_ranks, self._group_size(num_ranks))

    def _plan(self, lengths: list[int], num_ranks: int) -> tuple[Plan, str, dict[str, Any]]:
        d = self._group_size(num_ranks)
        fill = float(self.cfg.options.get("fill", 1.0))
        plan = static_plan(lengths, num_ranks, d, self._capacity(num_ranks, d), fill)
        return plan, "heuristic", {"group_size": d, "fill": fill}
