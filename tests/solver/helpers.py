"""Shared pieces of the solver tests: a toy additive cost model and brute-force optima."""

from __future__ import annotations

import itertools
from pathlib import Path

from solver.costs.base import CostModel

WIKIPEDIA = Path(__file__).resolve().parents[3] / "shared" / "data" / "lengths" / "wikipedia.txt"


class ToyCost(CostModel):
    """time(s, d) = (a s^2 + b s) / d + c s (d > 1); capacity k d tokens; fixed f per micro-batch."""

    name = "toy"

    def __init__(self, a=1e-3, b=1.0, c=0.2, k=10, f=0.5, overhead=0.0):
        self.a, self.b, self.c, self.k, self.f, self.o = a, b, c, k, f, overhead

    @property
    def fixed_s(self):
        return self.f

    def seq_time(self, s, d):
        return (self.a * s * s + self.b * s) / d + (self.c * s if d > 1 else 0.0)

    def seq_comm(self, s, d):
        return self.c * s if d > 1 else 0.0

    def group_overhead_s(self, d):
        return self.o if d > 1 else 0.0

    def capacity(self, d):
        return self.k * d


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1 :]
        yield [[first]] + part


def brute_force_optimum(lengths, cm, num_ranks, degrees):
    """Least step time over every plan (groups of any allowed size, any split into micro-batches)."""
    best = float("inf")
    idx = list(range(len(lengths)))
    for groups in set_partitions(idx):
        options = []
        for g in groups:
            toks = sum(lengths[i] for i in g)
            ds = [d for d in degrees if d <= num_ranks and toks <= cm.capacity(d)]
            if not ds:
                break
            options.append(ds)
        else:
            for ds in itertools.product(*options):
                times = [
                    cm.group_overhead_s(d) + sum(cm.seq_time(lengths[i], d) for i in g) for g, d in zip(groups, ds)
                ]
                for mbs in set_partitions(list(range(len(groups)))):
                    if any(sum(ds[k] for k in mb) > num_ranks for mb in mbs):
                        continue
                    cost = sum(cm.fixed_s + max(times[k] for k in mb) for mb in mbs)
                    best = min(best, cost)
    return best
