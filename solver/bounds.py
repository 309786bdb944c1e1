"""Lower bounds on a batch's step time, so every plan's gap is known.

bound = max(W / N, T_long) + M_min * fixed, where
- W: each sequence's least rank-seconds over the allowed sizes that hold it
  (d * time(s, d)); for a non-additive model (ring) only its compute, which no
  overlap can hide;
- T_long: the slowest sequence at its fastest allowed size (a micro-batch
  lasts at least as long as any group in it);
- M_min: the fewest micro-batches whose memory holds every token.
`tight_s` prices the longest sequence at one size d for both terms:
min over d of max(t(s, d), (W - w(s) + d t(s, d)) / N) + M_min * fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .costs.base import CostModel

INF = float("inf")


@dataclass
class LowerBound:
    total_s: float
    work_s: float
    longest_s: float
    min_micro_batches: int
    fixed_s: float
    tight_s: float = 0.0  # also pricing the longest sequence at one size for both terms (>= total_s)

    def gap(self, time_s: float) -> float:
        """Relative gap of a plan taking `time_s` (0.1 = 10% above the bound)."""
        return time_s / self.total_s - 1.0 if self.total_s > 0 else 0.0


def lower_bound(lengths: Sequence[int], cm: CostModel, degrees: Sequence[int], num_ranks: int) -> LowerBound:
    """The bound above for `lengths` on `num_ranks` ranks using group sizes `degrees`."""
    degs = [d for d in degrees if d <= num_ranks]
    if not degs:
        raise ValueError(f"no allowed group size fits in {num_ranks} ranks")

    def t(s: int, d: int) -> float:
        if s > cm.capacity(d):
            return INF
        if cm.additive:
            return cm.seq_time(s, d) + cm.group_overhead_s(d) * 0
        return cm.seq_time(s, d) - cm.seq_comm(s, d)

    work = 0.0
    longest = 0.0
    cache: dict[int, tuple[float, float]] = {}
    for s in lengths:
        if s not in cache:
            rank = min(d * t(s, d) for d in degs)
            fast = min(t(s, d) for d in degs)
            if rank == INF:
                raise ValueError(f"a sequence of {s} tokens fits no allowed group size on {num_ranks} ranks")
            cache[s] = (rank, fast)
        rank, fast = cache[s]
        work += rank
        longest = max(longest, fast)
    per_rank = max(cm.capacity(d) / d for d in degs)
    m_min = max(1, math.ceil(sum(lengths) / (per_rank * num_ranks) - 1e-9))
    body = max(work / num_ranks, longest)
    # Tighter: the longest sequence gets one size d; its micro-batch lasts t(s, d) and the
    # whole step at least (other work + d t(s, d)) / N. Take the best d.
    s_max = max(lengths)
    others = work - cache[s_max][0]
    joint = min(
        (max(t(s_max, d), (others + d * t(s_max, d)) / num_ranks) for d in degs if t(s_max, d) != INF),
        default=body,
    )
    fixed = m_min * cm.fixed_s
    return LowerBound(body + fixed, work / num_ranks, longest, m_min, fixed, max(body, joint) + fixed)
