"""The `greedy` planner: makespan-target scan with longest-first best-fit packing, then local search."""

from __future__ import annotations

from typing import Any

from .costed import CostedPlanner
from .heuristics import heuristic_pack
from .pack import MicroBatchLoad
from .table import CostTable


class GreedyPlanner(CostedPlanner):
    name = "greedy"

    def _solve(self, table: CostTable, num_ranks: int) -> tuple[list[MicroBatchLoad], str, dict[str, Any]]:
        budget = float(self.cfg.options.get("heuristic_s", 0.65 * self.cfg.time_limit_s))
        return heuristic_pack(table, num_ranks, budget), "heuristic", {}
