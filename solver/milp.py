"""The `milp` planner: the heuristic's plan, then the bucketed MILP warm-started from it.

Steps: (1) `heuristic_pack` (half the time limit at most); (2) the MILP of
`milp_model.py` over the batch, warm-started from (1), with HiGHS (or CBC,
``planner.options["backend"] = "cbc"``; HiGHS failing falls back to CBC,
logged once); (3) its solution dealt out to real sequences, polished by local
search and kept if faster. Whatever the solver does, a valid plan comes back.

Honest status (``meta["status"]``): "optimal" only when the model is exact
for this batch (one bucket per distinct length, every allowed size, enough
micro-batches) and the solver proved optimality (`sol_status`), so the plan
is optimal under the cost model's per-sequence times; "time_limit" when the
MILP ran but proved nothing; "heuristic" when it found no solution (the
heuristic plan is returned and ``meta["fallback"]`` says why).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from .costed import CostedPlanner
from .heuristics import heuristic_pack
from .local_search import LocalSearch
from .milp_model import solve_bucketed_milp
from .pack import MicroBatchLoad, plan_cost
from .table import CostTable

log = logging.getLogger("solver")
_said: set[str] = set()


def _once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.warning(msg)


class MilpPlanner(CostedPlanner):
    name = "milp"

    def _solve(self, table: CostTable, num_ranks: int) -> tuple[list[MicroBatchLoad], str, dict[str, Any]]:
        opts = self.cfg.options
        limit = float(self.cfg.time_limit_s)
        t0 = time.perf_counter()
        heur = heuristic_pack(table, num_ranks, float(opts.get("heuristic_s", min(0.65 * limit, 0.65 + 0.1 * limit))))
        h_cost = plan_cost(heur, table.fixed)
        t_heur = time.perf_counter() - t0
        n = len(table.lengths)
        distinct = len(set(table.lengths))
        exact_max = int(opts.get("exact_max_distinct", 24))
        exact = distinct <= exact_max
        num_buckets = distinct if exact else int(opts.get("num_buckets", 16))
        if exact:
            by_fixed = math.floor(h_cost / table.fixed) if table.fixed > 0 else n
            m_cap = min(n, max(len(heur), by_fixed))
            degrees = table.degrees
        else:
            m_cap = len(heur)
            degrees = sorted({g.d for mb in heur for g in mb.groups} | {table.min_degree(i) for i in range(n)})
        meta: dict[str, Any] = {
            "heuristic_s": t_heur,
            "heuristic_est_s": h_cost,
            "milp_exact": exact,
            "milp_buckets": num_buckets,
            "milp_micro_batches": m_cap,
        }
        # keep a margin for dealing out the solution and polishing it
        remaining = 0.85 * limit - (time.perf_counter() - t0)
        if remaining < 0.05:
            meta["fallback"] = "no time left for the MILP after the heuristic"
            return heur, "heuristic", meta
        # PuLP builds about 3000 variables a second here; a model that cannot be built and
        # searched in the time left is not tried.
        est_vars = m_cap * sum(num_ranks // d for d in degrees) * (num_buckets + 1)
        per_s = float(opts.get("max_vars_per_s", 3000))
        if est_vars > per_s * remaining:
            meta["fallback"] = (
                f"MILP skipped: about {est_vars} variables, more than {per_s:.0f}/s x {remaining:.2f} s left "
                "(raise planner.time_limit_s)"
            )
            _once(f"MILP too large for the time left ({est_vars} variables); using the heuristic plan")
            return heur, "heuristic", meta
        backend = str(opts.get("backend", "highs"))
        res = solve_bucketed_milp(
            list(range(n)), table, num_ranks, m_cap, degrees, remaining, num_buckets, warm=heur, backend=backend
        )
        if res.status == "error" and backend == "highs":
            _once(f"HiGHS failed ({res.note}); using CBC instead")
            remaining = limit - (time.perf_counter() - t0)
            res = solve_bucketed_milp(
                list(range(n)), table, num_ranks, m_cap, degrees, max(1.0, remaining), num_buckets, warm=heur,
                backend="cbc",
            )
        meta.update(
            {"milp_status": res.status, "milp_backend": res.backend, "milp_s": res.solve_s, "milp_vars": res.num_vars}
        )
        if res.micro_batches is None:
            meta["fallback"] = f"MILP gave no solution ({res.status}: {res.note}); heuristic plan returned"
            _once(f"MILP gave no solution ({res.status}); returning the heuristic plan")
            return heur, "heuristic", meta
        mbs = res.micro_batches
        if not exact:
            ls = LocalSearch(table, num_ranks, time.perf_counter() + max(0.02, 0.05 * limit))
            ls.improve(mbs)
        m_cost = plan_cost(mbs, table.fixed)
        meta["milp_est_s"] = m_cost
        if res.status == "optimal" and exact:
            status = "optimal"
            meta["optimal_micro_batches"] = len(mbs)
            # an exact model proven optimal is at least as good as the heuristic (up to float noise)
            chosen = mbs if m_cost <= h_cost + 1e-9 else heur
        else:
            status = "time_limit" if res.status in ("feasible", "optimal") else "heuristic"
            meta["optimal_micro_batches"] = 0
            chosen = mbs if m_cost < h_cost else heur
        meta["source"] = "milp" if chosen is mbs else "heuristic"
        return chosen, status, meta
