"""Bucketing: group sorted lengths into Q buckets with the least total padding (dynamic program).

A sequence of length s in a bucket with upper bound u is costed as if it had
u tokens, so padding is ``f(u) - f(s)`` for a weight function f (tokens by
default; the MILP passes a cost so that padding is measured in time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class Buckets:
    """`bounds[q]` is bucket q's upper bound (ascending); `members[q]` the sequence indices in it."""

    bounds: list[int]
    members: list[list[int]]
    padding: float

    @property
    def counts(self) -> list[int]:
        return [len(m) for m in self.members]


def bucketize(
    lengths: Sequence[int], num_buckets: int, weight: Callable[[int], float] | None = None
) -> Buckets:
    """Optimal padding bucketing of `lengths` into at most `num_buckets` buckets.

    DP over the sorted distinct lengths v_1 < ... < v_K with counts c_k:
    best[q][j] = min_i best[q-1][i] + sum_{i<k<=j} c_k (f(v_j) - f(v_k)).
    O(Q K^2) arithmetic, vectorised over i. Bucket bounds are actual lengths.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if not lengths:
        return Buckets([], [], 0.0)
    f = weight or float
    values = sorted(set(int(s) for s in lengths))
    K = len(values)
    count = {v: 0 for v in values}
    for s in lengths:
        count[int(s)] += 1
    c = np.array([count[v] for v in values], dtype=float)
    fv = np.array([f(v) for v in values], dtype=float)
    C = np.concatenate([[0.0], np.cumsum(c)])  # C[j] = count of v_1..v_j
    F = np.concatenate([[0.0], np.cumsum(c * fv)])
    Q = min(num_buckets, K)
    inf = float("inf")
    best = np.full(K + 1, inf)
    best[0] = 0.0
    choice = np.zeros((Q + 1, K + 1), dtype=np.int64)
    for q in range(1, Q + 1):
        new = np.full(K + 1, inf)
        for j in range(1, K + 1):
            i = np.arange(0, j)
            cost = best[:j] + fv[j - 1] * (C[j] - C[i]) - (F[j] - F[i])
            k = int(np.argmin(cost))
            new[j] = cost[k]
            choice[q, j] = k
        best = new
    # Recover the cut points.
    bounds_idx = []
    j = K
    q = Q
    while j > 0:
        bounds_idx.append(j - 1)
        j = int(choice[q, j])
        q -= 1
    bounds_idx.reverse()
    bounds = [values[k] for k in bounds_idx]
    members: list[list[int]] = [[] for _ in bounds]
    import bisect

    for idx, s in enumerate(lengths):
        members[bisect.bisect_left(bounds, int(s))].append(idx)
    return Buckets(bounds, members, float(best[K]))
