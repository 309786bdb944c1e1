"""Cost a whole `Plan` with a cost model: step time and where it goes.

A micro-batch lasts ``cm.micro_batch_time`` (``fixed_s + max over non-empty
groups of group_time``, unless the model knows that its ranks share cores);
the step lasts the sum over micro-batches. Idle rank-seconds count every rank
that waits in a micro-batch: ranks in no group, in an empty group, or
in a group that finishes before the slowest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hetsp.plan import Plan

from .costs.base import CostModel


@dataclass
class MicroBatchCost:
    time_s: float
    group_times_s: list[float]
    compute_s: float  # critical group's compute
    comm_s: float  # critical group's exposed communication
    fixed_s: float
    idle_rank_s: float
    max_memory_frac: float  # largest group tokens / capacity


@dataclass
class SimResult:
    total_s: float
    micro_batches: list[MicroBatchCost] = field(default_factory=list)

    @property
    def compute_s(self) -> float:
        return sum(m.compute_s for m in self.micro_batches)

    @property
    def comm_s(self) -> float:
        return sum(m.comm_s for m in self.micro_batches)

    @property
    def fixed_s(self) -> float:
        return sum(m.fixed_s for m in self.micro_batches)

    @property
    def idle_rank_s(self) -> float:
        return sum(m.idle_rank_s for m in self.micro_batches)

    def breakdown(self) -> dict[str, float]:
        return {
            "total_s": self.total_s,
            "compute_s": self.compute_s,
            "comm_s": self.comm_s,
            "fixed_s": self.fixed_s,
            "idle_rank_s": self.idle_rank_s,
        }


def micro_batch_time(groups: list[tuple[int, list[int]]], cm: CostModel) -> float:
    """Time of one micro-batch given ``(group size, lengths)`` pairs (empty groups cost nothing)."""
    return cm.micro_batch_time(groups)


def simulate(plan: Plan, cm: CostModel, num_ranks: int | None = None) -> SimResult:
    """Step time of `plan` under `cm`, with a per-micro-batch breakdown.

    `num_ranks` (default: the highest rank any group uses) sizes the idle count.
    A plan that splits one of its bundles over micro-batches is refused (PlanError).
    """
    plan.check_bundle_placement()
    world = num_ranks or max((g.stop for g in plan.groups()), default=1)
    out = SimResult(0.0)
    for mb in plan.micro_batches:
        times, parts, mem, loads = [], [], 0.0, []
        for g in mb.groups:
            ls = [plan.lengths[s] for s in g.seqs]
            if not ls:
                continue
            loads.append((g.size, ls))
            b = cm.group_breakdown(ls, g.size)
            times.append(b["compute_s"] + b["comm_s"])
            parts.append(b)
            mem = max(mem, sum(ls) / cm.capacity(g.size))
        if times:
            k = max(range(len(times)), key=times.__getitem__)
            span = times[k]
            busy = sum(t * g.size for t, g in zip(times, [g for g in mb.groups if g.seqs]))
            comp, comm = parts[k]["compute_s"], parts[k]["comm_s"]
        else:
            span, busy, comp, comm = 0.0, 0.0, 0.0, 0.0
        t = cm.micro_batch_time(loads) if loads else cm.fixed_s
        out.micro_batches.append(
            MicroBatchCost(t, times, comp, comm, cm.fixed_s, world * span - busy, mem)
        )
        out.total_s += t
    return out
