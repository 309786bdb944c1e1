"""Base for planners that use a cost model: degrees, cost table, memory limit, plan conversion."""

from __future__ import annotations

from typing import Any

from hetsp.plan import Plan

from .base import Planner, expand_bundles
from .degrees import candidate_degrees
from .layout import to_plan
from .pack import MicroBatchLoad
from .table import CostTable


class CostedPlanner(Planner):
    """Planner with a cost model; subclasses implement `_solve(table, num_ranks) -> (mbs, status, meta)`."""

    def degrees(self, num_ranks: int) -> list[int]:
        return candidate_degrees(
            self.cfg.allowed_group_sizes,
            num_ranks,
            int(self.cfg.options.get("max_degrees", 40)),
            self.cluster.ranks_per_node,
        )

    def max_fit_length(self, num_ranks: int) -> int:
        cm = self.cost_model(num_ranks)
        return max(cm.capacity(d) for d in self.degrees(num_ranks))

    def table(self, lengths: list[int], num_ranks: int) -> CostTable:
        return CostTable(lengths, self.degrees(num_ranks), self.cost_model(num_ranks))

    def _plan_bundled(self, lengths: list[int], bundles: list[list[int]], num_ranks: int):
        """Each bundle is one item in one group, costing the sum of its sequences' times."""
        totals = [sum(lengths[s] for s in b) for b in bundles]
        plan, status, meta = self._plan(totals, num_ranks, [[lengths[s] for s in b] for b in bundles])
        return expand_bundles(plan, lengths, bundles), status, meta

    def _solve(self, table: CostTable, num_ranks: int) -> tuple[list[MicroBatchLoad], str, dict[str, Any]]:
        raise NotImplementedError

    def _plan(
        self, lengths: list[int], num_ranks: int, members: list[list[int]] | None = None
    ) -> tuple[Plan, str, dict[str, Any]]:
        table = CostTable(lengths, self.degrees(num_ranks), self.cost_model(num_ranks), members)
        mbs, status, meta = self._solve(table, num_ranks)
        plan = to_plan(lengths, mbs, num_ranks, self.cluster.ranks_per_node)
        meta.setdefault("cost_model", self.cfg.cost_model)
        return plan, status, meta
