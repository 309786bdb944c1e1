"""The MILP over bucketed sequences, virtual groups and micro-batches (PuLP; HiGHS or CBC).

Model (for M micro-batches, each with virtual groups p of fixed degree d_p):
  minimise    sum_m (C_m + fixed * z_m)
  subject to  sum_{p in m} d_p y_p <= N z_m                      ranks of micro-batch m
              sum_{p} x_{q,p} = n_q                              every sequence of bucket q placed
              sum_q u_q x_{q,p} <= cap(d_p) y_p                  memory (bucket upper bounds)
              o(d_p) y_p + sum_q t_{q,d_p} x_{q,p} <= C_m         group time (bucket mean times)
              y_p >= y_{p+1}, load_p >= load_{p+1}               order identical groups (symmetry)
              z_m >= z_{m+1}                                     order micro-batches
with x integer, y and z binary. Buckets come from the padding DP of
`bucketing.py`; t_{q,d} is the mean of the bucket members' times, so a group
holding a whole bucket is costed exactly; memory uses the upper bound so a
solution never overflows. The solution is turned into real groups by dealing
out each bucket's members; the caller re-costs it exactly.

PuLP reports a time-limited HiGHS run as "Optimal"; the solve status here
comes from `prob.sol_status` (1 = proven optimal, 2 = feasible only).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

from .bucketing import bucketize
from .pack import INF, GroupLoad, MicroBatchLoad
from .table import CostTable

log = logging.getLogger("solver")
_logged: set[str] = set()


def log_once(msg: str, level: int = logging.INFO) -> None:
    """Log `msg` the first time only (a fallback is said once, at the start, not every batch)."""
    if msg not in _logged:
        _logged.add(msg)
        log.log(level, msg)


@dataclass
class MilpResult:
    micro_batches: list[MicroBatchLoad] | None
    status: str  # "optimal" | "feasible" | "no_solution" | "error"
    backend: str
    objective: float | None
    solve_s: float
    num_vars: int
    note: str = ""


_BANNER_LOCK = threading.Lock()
_BANNER = [False]  # whether highspy has printed (and we swallowed) its start-up banner


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1 (C-level prints included) for the duration."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _make_highs(time_limit: float, threads: int | None):
    import pulp

    class WarmHiGHS(pulp.HiGHS):
        """PuLP's HiGHS with a warm start taken from the variables' initial values."""

        def createAndConfigureSolver(self, lp):  # noqa: N802 (PuLP's name)
            # highspy prints a banner on stdout the first time a solver is made in a process,
            # whatever output_flag says; it would corrupt --json output. Silence that one time
            # only: redirecting fd 1 is process-wide, and planning may run beside training.
            with _BANNER_LOCK:
                if _BANNER[0]:
                    super().createAndConfigureSolver(lp)
                    return
                with _quiet_stdout():
                    super().createAndConfigureSolver(lp)
                _BANNER[0] = True

        def callSolver(self, lp):  # noqa: N802 (PuLP's name)
            import highspy

            values = [v.varValue for v in lp.variables()]
            if all(x is not None for x in values):
                sol = highspy.HighsSolution()
                sol.col_value = [float(x) for x in values]
                sol.value_valid = True
                try:
                    lp.solverModel.setSolution(sol)
                except Exception as e:  # older highspy: no warm start, say so once
                    log_once(f"HiGHS warm start unavailable ({e}); solving from scratch")
            lp.solverModel.run()

    return WarmHiGHS(msg=False, timeLimit=max(0.01, time_limit), threads=threads, mip_rel_gap=1e-4)


def bucket_times(table: CostTable, seqs: list[int], degs: list[int], num_buckets: int):
    """Bucket `seqs` (indices into `table`) by length and give each bucket its mean time per degree.

    Returns (members, counts, upper bounds, {(bucket, degree): mean time, INF if any member cannot run}).
    Buckets come from the padding dynamic program, weighted by the time at the smallest degree.
    """
    lengths = [table.lengths[i] for i in seqs]
    d0 = degs[0]
    bk = bucketize(lengths, num_buckets, weight=lambda s: table.row(s)[d0] if table.row(s)[d0] != INF else float(s))
    members = [[seqs[j] for j in m] for m in bk.members]
    t_qd = {}
    for q, m in enumerate(members):
        for d in degs:
            ts = [table.time[i][d] for i in m]
            t_qd[q, d] = INF if any(t == INF for t in ts) else sum(ts) / len(ts)
    return members, [len(m) for m in members], bk.bounds, t_qd


def solve_bucketed_milp(
    idx: list[int],
    table: CostTable,
    num_ranks: int,
    num_micro_batches: int,
    degrees: list[int],
    time_limit: float,
    num_buckets: int = 16,
    warm: list[MicroBatchLoad] | None = None,
    max_groups_per_degree: dict[int, int] | None = None,
    backend: str = "highs",
) -> MilpResult:
    """Solve the model above for sequences `idx` and return real micro-batches.

    `max_groups_per_degree[d]` caps the virtual groups of degree d per
    micro-batch (default N // d). `warm` (micro-batches over the same `idx`
    and `degrees`) is given to the solver as a starting solution.
    """
    import pulp

    t0 = time.perf_counter()
    N = num_ranks
    degs = sorted(d for d in set(degrees) if d <= N)
    members, n_q, u_q, t_qd = bucket_times(table, idx, degs, num_buckets)
    Q = len(members)
    M = num_micro_batches
    prob = pulp.LpProblem("hetsp_plan", pulp.LpMinimize)
    C = [pulp.LpVariable(f"C_{m}", lowBound=0) for m in range(M)]
    z = [pulp.LpVariable(f"z_{m}", cat="Binary") for m in range(M)]
    groups = []  # (m, d, k, y, {q: x})
    for m in range(M):
        for d in degs:
            K = N // d
            if max_groups_per_degree is not None:
                K = min(K, max_groups_per_degree.get(d, 0))
            feas_q = [q for q in range(Q) if u_q[q] <= table.cap[d] and t_qd[q, d] != INF]
            if not feas_q or K == 0:
                continue
            for k in range(K):
                y = pulp.LpVariable(f"y_{m}_{d}_{k}", cat="Binary")
                xs = {q: pulp.LpVariable(f"x_{m}_{d}_{k}_{q}", lowBound=0, upBound=n_q[q], cat="Integer") for q in feas_q}
                groups.append((m, d, k, y, xs))
    num_vars = len(prob.variables()) if False else sum(1 + len(g[4]) for g in groups) + 2 * M
    prob += pulp.lpSum(C) + table.fixed * pulp.lpSum(z)
    by_md: dict[tuple[int, int], list] = {}
    for g in groups:
        by_md.setdefault((g[0], g[1]), []).append(g)
    for m in range(M):
        prob += pulp.lpSum(d * g[3] for (mm, d), gs in by_md.items() if mm == m for g in gs) <= N * z[m], f"ranks_{m}"
        if m + 1 < M:
            prob += z[m] >= z[m + 1], f"order_mb_{m}"
            prob += C[m] >= C[m + 1], f"order_C_{m}"
    for q in range(Q):
        prob += pulp.lpSum(g[4][q] for g in groups if q in g[4]) == n_q[q], f"place_{q}"
    loads = {}
    for m, d, k, y, xs in groups:
        prob += pulp.lpSum(u_q[q] * x for q, x in xs.items()) <= table.cap[d] * y, f"mem_{m}_{d}_{k}"
        load = table.overhead[d] * y + pulp.lpSum(t_qd[q, d] * x for q, x in xs.items())
        loads[m, d, k] = load
        prob += load <= C[m], f"time_{m}_{d}_{k}"
        # a selected group holds at least one sequence
        prob += pulp.lpSum(xs.values()) >= y, f"nonempty_{m}_{d}_{k}"
    for (m, d), gs in by_md.items():
        for a, b in zip(gs, gs[1:]):
            prob += a[3] >= b[3], f"sym_y_{m}_{d}_{a[2]}"
            prob += loads[m, d, a[2]] >= loads[m, d, b[2]], f"sym_load_{m}_{d}_{a[2]}"

    warm_ok = False
    if warm is not None:
        warm_ok = _set_warm_start(warm, members, groups, C, z, t_qd, table.overhead)
        if not warm_ok:
            log_once("the warm start does not fit the model's virtual groups; the solver starts cold")
            for v in prob.variables():
                v.varValue = None

    # PuLP hands the model to the solver inside solve(), which costs about as much as building it.
    built = time.perf_counter() - t0
    remaining = time_limit - 2.2 * built
    if remaining < 0.02:
        return MilpResult(None, "no_solution", backend, None, built, num_vars, "no time left to solve after building")
    status, used = "error", backend
    try:
        if backend == "highs":
            solver = _make_highs(remaining, threads=1)
        else:
            solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, round(remaining)), warmStart=warm_ok)
        prob.solve(solver)
    except Exception as e:  # a broken backend must not break planning
        return MilpResult(None, "error", used, None, time.perf_counter() - t0, num_vars, f"{used} failed: {e}")
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = "optimal"
    elif prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "feasible"
    else:
        return MilpResult(None, "no_solution", used, None, time.perf_counter() - t0, num_vars, pulp.LpStatus[prob.status])
    # CBC can leave meaningless values when it finds nothing: check them before use.
    try:
        mbs = _extract(groups, members, table, N, M)
    except ValueError as e:
        return MilpResult(None, "no_solution", used, None, time.perf_counter() - t0, num_vars, str(e))
    return MilpResult(mbs, status, used, pulp.value(prob.objective), time.perf_counter() - t0, num_vars, f"warm={warm_ok}")


def _set_warm_start(warm, members, groups, C, z, t_qd, overhead) -> bool:
    """Give the solver `warm` as its starting point; False if it does not fit the virtual groups."""
    bucket_of = {i: q for q, ms in enumerate(members) for i in ms}

    def model_load(g) -> float:
        return overhead[g.d] + sum(t_qd[bucket_of[i], g.d] for i in g.seqs)

    # Order micro-batches and groups the way the symmetry constraints require.
    wmbs = sorted(warm, key=lambda mb: -max((model_load(g) for g in mb.groups if g.seqs), default=0.0))
    by_md: dict[tuple[int, int], list] = {}
    for g in groups:
        by_md.setdefault((g[0], g[1]), []).append(g)
        g[3].setInitialValue(0)
        for x in g[4].values():
            x.setInitialValue(0)
    for m in range(len(C)):
        C[m].setInitialValue(0)
        z[m].setInitialValue(0)
    if len(wmbs) > len(C):
        return False
    for m, mb in enumerate(wmbs):
        z[m].setInitialValue(1)
        span = 0.0
        for d in sorted({g.d for g in mb.groups if g.seqs}):
            gs = sorted((g for g in mb.groups if g.seqs and g.d == d), key=lambda g: -model_load(g))
            slots = by_md.get((m, d), [])
            if len(gs) > len(slots):
                return False
            for g, slot in zip(gs, slots):
                slot[3].setInitialValue(1)
                for i in g.seqs:
                    x = slot[4].get(bucket_of[i])
                    if x is None:
                        return False
                    x.setInitialValue(x.varValue + 1)
                span = max(span, model_load(g))
        C[m].setInitialValue(span)
    return True


def _extract(groups, members, table: CostTable, N: int, M: int) -> list[MicroBatchLoad]:
    pools = [sorted(ms, key=lambda i: -table.lengths[i]) for ms in members]
    mbs = [MicroBatchLoad([], N) for _ in range(M)]
    for m, d, k, y, xs in groups:
        if (y.varValue or 0) < 0.5:
            continue
        seqs = []
        for q, x in xs.items():
            cnt = int(round(x.varValue or 0))
            if cnt < 0 or cnt > len(pools[q]):
                raise ValueError(f"solver returned {cnt} sequences of bucket {q}, which holds {len(pools[q])}")
            seqs.extend(pools[q][:cnt])
            del pools[q][:cnt]
        if not seqs:
            continue
        g = GroupLoad(d, table.overhead[d] + sum(table.time[i][d] for i in seqs), sum(table.lengths[i] for i in seqs), seqs)
        mbs[m].groups.append(g)
        mbs[m].free -= d
    if any(pools):
        raise ValueError("solver left sequences unplaced")
    for mb in mbs:
        if mb.free < 0:
            raise ValueError("solver used more ranks than exist")
    return [mb for mb in mbs if mb.groups]
