"""The `milp` planner: the heuristic's plan, then integer programs where they pay off in the time limit.

1. `heuristic_pack` (about 65% of ``planner.time_limit_s``).
2. Small batches (at most ``options["exact_max_distinct"]`` = 24 distinct lengths): the
   virtual-group MILP of `milp_model.py` with one bucket per distinct length, every
   allowed size and enough micro-batches, warm-started from (1). Exact for the cost
   model's per-sequence times, so a proven optimum is the plan's optimum.
3. Larger batches: the pooled count MILP of `milp_counts.py` on each micro-batch
   (slowest first) while time lasts; a re-packing it finds is kept when faster.
HiGHS by default (``options["backend"] = "cbc"`` for CBC; a HiGHS failure falls back
to CBC, logged once). Whatever the solvers do, a valid plan comes back.

Honest status (``meta["status"]``): "optimal" only from step 2 with optimality
proven by the solver (PuLP's `sol_status`, since it calls a time-limited HiGHS
run "Optimal"); "time_limit" when a MILP ran without proving the plan optimal;
"heuristic" when none ran or none found a solution (``meta["fallback"]`` says why).
``meta["optimal_micro_batches"]`` counts micro-batches of plans proven optimal.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from .costed import CostedPlanner
from .heuristics import heuristic_pack
from .local_search import LocalSearch
from .milp_counts import solve_micro_batch_counts
from .milp_model import log_once, solve_bucketed_milp
from .pack import MicroBatchLoad, plan_cost
from .table import CostTable



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
        # turning the packing into a validated, costed Plan takes about 20 us per sequence
        deadline = t0 + 0.85 * limit - 2e-5 * n
        remaining = deadline - time.perf_counter()
        if remaining < 0.05:
            meta["fallback"] = "no time left for the MILP after the heuristic"
            return heur, "heuristic", meta
        if not exact:
            return self._polish_with_counts(heur, table, num_ranks, deadline, meta)
        # PuLP builds about 3000 variables a second here; a model that cannot be built and
        # searched in the time left is not tried.
        est_vars = m_cap * sum(num_ranks // d for d in degrees) * (num_buckets + 1)
        per_s = float(opts.get("max_vars_per_s", 3000))
        if est_vars > per_s * remaining:
            meta["fallback"] = (
                f"exact MILP skipped: about {est_vars} variables, more than {per_s:.0f}/s x {remaining:.2f} s left "
                "(raise planner.time_limit_s)"
            )
            log_once("the exact MILP is too large for the time left; using the heuristic plan (see meta['fallback'])", logging.WARNING)
            return self._polish_with_counts(heur, table, num_ranks, deadline, meta)
        backend = str(opts.get("backend", "highs"))
        res = solve_bucketed_milp(
            list(range(n)), table, num_ranks, m_cap, degrees, remaining, num_buckets, warm=heur, backend=backend
        )
        if res.status == "error" and backend == "highs":
            log_once(f"HiGHS failed ({res.note}); using CBC instead", logging.WARNING)
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
            log_once("the MILP gave no solution; returning the heuristic plan (see meta['fallback'])", logging.WARNING)
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

    def _polish_with_counts(self, heur, table: CostTable, num_ranks: int, deadline: float, meta: dict[str, Any]):
        """Re-solve micro-batches (longest first) with the pooled count MILP while time lasts; keep gains."""
        mbs = list(heur)
        tried = improved = proven = 0
        for k in sorted(range(len(mbs)), key=lambda k: -mbs[k].makespan()):
            left = deadline - time.perf_counter()
            if left < 0.05:
                break
            mb = mbs[k]
            seqs = [i for g in mb.groups for i in g.seqs]
            fluid = max(sum(table.min_rank_time(i) for i in seqs) / num_ranks, max(table.min_time(i) for i in seqs))
            if mb.makespan() <= 1.01 * fluid:
                continue  # already within 1% of what any packing of this micro-batch can reach
            res = solve_micro_batch_counts(
                seqs, table, num_ranks, mb.makespan() * 1.5, left, int(self.cfg.options.get("num_buckets", 16))
            )
            tried += 1
            proven += res.status == "optimal"
            if res.micro_batch is not None and res.micro_batch.makespan() < mb.makespan() - 1e-12:
                mbs[k] = res.micro_batch
                improved += 1
        meta.update({"count_milp_tried": tried, "count_milp_proven": proven, "count_milp_improved": improved})
        meta["optimal_micro_batches"] = 0
        meta["source"] = "milp" if improved else "heuristic"
        return mbs, ("time_limit" if tried else "heuristic"), meta
