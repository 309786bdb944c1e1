"""Plan batches with one planner and the baselines, and cost them all with the same model.

Used by the inspection CLI and by ``bench/solver.py``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from hetsp.plan import Plan

from .baselines import static_packing
from .bounds import lower_bound
from .degrees import candidate_degrees
from .layout import to_plan
from .pack import plan_cost
from .simulate import simulate
from .table import CostTable

BASELINES = ("static", "batch_adaptive", "greedy")


@dataclass
class BatchReport:
    index: int
    lengths: list[int]
    plan: Plan
    bound: dict[str, float]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # planner -> est_s, gap, solve_s, status

    def to_dict(self, with_plan: bool = True) -> dict[str, Any]:
        d = {
            "batch": self.index,
            "num_seqs": len(self.lengths),
            "tokens": sum(self.lengths),
            "lower_bound": self.bound,
            "planners": self.rows,
        }
        if with_plan:
            d["plan"] = self.plan.to_dict()
        return d


def static_sizes(table: CostTable, num_ranks: int) -> list[int]:
    return [d for d in table.degrees if d <= num_ranks and max(table.lengths) <= table.cap[d]]


def compare_batch(
    index: int,
    lengths: Sequence[int],
    num_ranks: int,
    planner_name: str,
    planner_cfg,
    cluster_cfg,
    model_cfg=None,
    baselines: Sequence[str] = BASELINES,
    static_fill: float = 1.0,
    recorded: Plan | None = None,
    bundles: Sequence[Sequence[int]] | None = None,
) -> BatchReport:
    """Plan `lengths` with `planner_name` and each baseline; all costed by the planner's cost model.

    `recorded`: a plan a training run executed for these lengths, costed as the row "recorded".
    `bundles`: sequences that must share a micro-batch (every planner gets them; the
    bundle-blind static_max baseline is then left out).
    """
    from . import get_planner

    main = get_planner(planner_name, planner_cfg, cluster_cfg, model_cfg)
    plan = main.plan(lengths, num_ranks, bundles)
    cm = main.cost_model(num_ranks)
    kept = list(plan.lengths)
    degs = candidate_degrees(planner_cfg.allowed_group_sizes, num_ranks, 40, cluster_cfg.ranks_per_node)
    lb = lower_bound(kept, cm, degs, num_ranks)
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, est: float, solve: float, status: str, mbs: int, extra: dict | None = None) -> None:
        rows[name] = {"est_s": est, "gap": lb.gap(est), "solve_s": solve, "status": status, "micro_batches": mbs}
        if extra:
            rows[name].update(extra)

    add(planner_name, simulate(plan, cm, num_ranks).total_s, plan.meta["solve_s"], plan.meta["status"],
        plan.num_micro_batches, {k: plan.meta[k] for k in ("optimal_micro_batches",) if k in plan.meta})
    if recorded is not None:
        recorded.validate(max(num_ranks, max((g.stop for g in recorded.groups()), default=1)))
        add("recorded", simulate(recorded, cm, num_ranks).total_s, float(recorded.meta.get("solve_s", 0.0)),
            str(recorded.meta.get("planner", "?")), recorded.num_micro_batches)
    table = CostTable(kept, degs, cm)
    if "static" in baselines and not plan.bundles:
        sizes = static_sizes(table, num_ranks)
        if sizes:
            d = sizes[-1]
            t0 = time.perf_counter()
            mbs = static_packing(table, num_ranks, d, static_fill)
            p = to_plan(kept, mbs, num_ranks, cluster_cfg.ranks_per_node)
            add("static_max", simulate(p, cm, num_ranks).total_s, time.perf_counter() - t0, "heuristic",
                p.num_micro_batches, {"group_size": d})
    for name in baselines:
        if name in ("static", planner_name):
            continue
        cfg = copy.deepcopy(planner_cfg)
        if name == "batch_adaptive":
            cfg.options = {**cfg.options, "fill": static_fill}
        p = get_planner(name, cfg, cluster_cfg, model_cfg).plan(kept, num_ranks, plan.bundles or None)
        extra = {"group_size": p.meta["group_size"]} if "group_size" in p.meta else None
        add(name, simulate(p, cm, num_ranks).total_s, p.meta["solve_s"], p.meta["status"], p.num_micro_batches, extra)
    bound = {
        "total_s": lb.total_s,
        "work_s": lb.work_s,
        "longest_s": lb.longest_s,
        "min_micro_batches": lb.min_micro_batches,
        "tight_s": lb.tight_s,
    }
    return BatchReport(index, list(lengths), plan, bound, rows)


def best_static_total(
    batches: Sequence[Sequence[int]], num_ranks: int, cm, degrees: Sequence[int], fill: float = 1.0
) -> tuple[int, float] | None:
    """(size, total) of the single group size that is fastest over all `batches` (static packing)."""
    tables = [CostTable(list(lengths), degrees, cm) for lengths in batches]
    best = None
    for d in degrees:
        if d > num_ranks:
            continue
        total = 0.0
        for table in tables:
            mbs = static_packing(table, num_ranks, d, fill)
            if mbs is None:
                break
            total += plan_cost(mbs, table.fixed)
        else:
            if best is None or total < best[1]:
                best = (d, total)
    return best
