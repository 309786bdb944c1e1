"""A compact MILP for one micro-batch: how many groups of each size, and which buckets go to each size.

For a fixed set of sequences (one micro-batch), time is separable by group
under an additive cost model, and identical groups are interchangeable, so
instead of one variable per virtual group this model counts:

  minimise    C
  subject to  sum_d d g_d <= N                                  ranks
              sum_d x_{q,d} = n_q                               every sequence of bucket q placed
              sum_q u_q x_{q,d} <= cap(d) g_d                   memory of the size-d groups together
              o(d) g_d + sum_q t_{q,d} x_{q,d} <= C g_d         time of the size-d groups together
              t_{q,d} + o(d) <= C  where x_{q,d} > 0            one sequence never splits
with g_d = sum_k 2^k b_{d,k} (binary digits) and C g_d linearised exactly
through w_{d,k} = C b_{d,k} (w <= C, w <= C_max b). It pools each size's
groups, so it is a relaxation of the packing: after solving, each size's
sequences are dealt to its g_d groups longest first and the result is costed
exactly. Tens to hundreds of variables: HiGHS solves it to optimality in
milliseconds, and `optimal` then means optimal for this pooled model only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .milp_model import _make_highs, bucket_times
from .pack import INF, GroupLoad, MicroBatchLoad
from .table import CostTable


@dataclass
class CountResult:
    micro_batch: MicroBatchLoad | None
    status: str  # "optimal" | "feasible" | "no_solution" | "error"
    bound: float | None  # the model's C (a makespan estimate)
    solve_s: float
    note: str = ""


def solve_micro_batch_counts(
    seqs: list[int],
    table: CostTable,
    num_ranks: int,
    c_max: float,
    time_limit: float = 0.2,
    num_buckets: int = 24,
) -> CountResult:
    """Group sizes and bucket shares for the micro-batch holding `seqs`, then real groups."""
    import pulp

    t0 = time.perf_counter()
    N = num_ranks
    degs = [d for d in table.degrees if d <= N]
    members, n_q, u_q, t_qd = bucket_times(table, seqs, degs, num_buckets)
    Q = len(members)
    prob = pulp.LpProblem("micro_batch_counts", pulp.LpMinimize)
    C = pulp.LpVariable("C", lowBound=0, upBound=c_max)
    g_expr, w_expr, x = {}, {}, {}
    for d in degs:
        kmax = (N // d).bit_length()
        bs = [pulp.LpVariable(f"b_{d}_{k}", cat="Binary") for k in range(kmax)]
        ws = [pulp.LpVariable(f"w_{d}_{k}", lowBound=0) for k in range(kmax)]
        for b, w in zip(bs, ws):
            prob += w <= C
            prob += w <= c_max * b
        g_expr[d] = pulp.lpSum((2**k) * b for k, b in enumerate(bs))
        w_expr[d] = pulp.lpSum((2**k) * w for k, w in enumerate(ws))
        prob += g_expr[d] <= N // d
        for q in range(Q):
            if u_q[q] <= table.cap[d] and t_qd[q, d] + table.overhead[d] <= c_max:
                x[q, d] = pulp.LpVariable(f"x_{q}_{d}", lowBound=0, upBound=n_q[q], cat="Integer")
                z = pulp.LpVariable(f"z_{q}_{d}", cat="Binary")
                prob += x[q, d] <= n_q[q] * z
                prob += (t_qd[q, d] + table.overhead[d]) * z <= C
    prob += C
    prob += pulp.lpSum(d * g_expr[d] for d in degs) <= N
    for q in range(Q):
        xs = [x[q, d] for d in degs if (q, d) in x]
        if not xs:
            return CountResult(None, "no_solution", None, time.perf_counter() - t0, f"bucket {q} fits no size within C_max")
        prob += pulp.lpSum(xs) == n_q[q]
    for d in degs:
        xs = [(q, x[q, d]) for q in range(Q) if (q, d) in x]
        prob += pulp.lpSum(u_q[q] * v for q, v in xs) <= table.cap[d] * g_expr[d]
        prob += table.overhead[d] * g_expr[d] + pulp.lpSum(t_qd[q, d] * v for q, v in xs) <= w_expr[d]
    left = time_limit - 2.2 * (time.perf_counter() - t0)
    if left < 0.01:
        return CountResult(None, "no_solution", None, time.perf_counter() - t0, "no time left to solve")
    try:
        prob.solve(_make_highs(left, threads=1))
    except Exception as e:  # a broken backend must not break planning
        return CountResult(None, "error", None, time.perf_counter() - t0, f"HiGHS failed: {e}")
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = "optimal"
    elif prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "feasible"
    else:
        return CountResult(None, "no_solution", None, time.perf_counter() - t0, pulp.LpStatus[prob.status])
    # Deal each size's sequences to its groups: longest first, to the least loaded group with memory.
    mb = MicroBatchLoad([], N)
    pools = [sorted(m, key=lambda i: -table.lengths[i]) for m in members]
    for d in degs:
        g = int(round(pulp.value(g_expr[d]) or 0))
        mine: list[int] = []
        for q in range(Q):
            if (q, d) in x:
                cnt = int(round(x[q, d].varValue or 0))
                mine.extend(pools[q][:cnt])
                del pools[q][:cnt]
        if not mine:
            continue
        if g < 1:
            return CountResult(None, "no_solution", None, time.perf_counter() - t0, "sequences on a size with no group")
        groups = [GroupLoad(d, table.overhead[d], 0, []) for _ in range(g)]
        for i in sorted(mine, key=lambda i: -table.time[i][d]):
            fit = [h for h in groups if h.tokens + table.lengths[i] <= table.cap[d]]
            if not fit:
                return CountResult(None, "no_solution", None, time.perf_counter() - t0, "dealing out broke memory")
            h = min(fit, key=lambda h: h.load)
            h.seqs.append(i)
            h.tokens += table.lengths[i]
            h.load += table.time[i][d]
        for h in groups:
            if h.seqs:
                mb.groups.append(h)
                mb.free -= d
    if any(pools) or mb.free < 0:
        return CountResult(None, "no_solution", None, time.perf_counter() - t0, "solution did not place every sequence")
    return CountResult(mb, status, pulp.value(C), time.perf_counter() - t0)
