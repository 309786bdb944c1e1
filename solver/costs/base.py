"""The cost model interface shared by the planners, the bounds and the simulator.

Units: seconds and tokens. A micro-batch's time is
``fixed_s + max over its non-empty groups of group_time(lengths, d)``
(`micro_batch_time`; a model whose ranks share cores refines it), and a batch's time is the sum over its micro-batches. A group of `d` ranks
may hold at most ``capacity(d)`` tokens in total (activation memory).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence


class CostModel(ABC):
    """time(s, d), memory and a fixed cost per micro-batch.

    `seq_time(s, d)` is the time one sequence of `s` tokens adds to a group
    of `d` ranks. When `additive` is True, ``group_time(S, d) ==
    group_overhead_s(d) + sum(seq_time(s, d) for s in S)`` exactly; when it
    is False (ring overlap), that sum is an upper bound the MILP uses and
    `group_time` is the exact figure the simulator uses.
    """

    name: str = "base"
    additive: bool = True

    @property
    @abstractmethod
    def fixed_s(self) -> float:
        """Fixed time of every micro-batch (seconds): e.g. per-micro-batch collectives, launch costs."""

    @property
    def step_s(self) -> float:
        """Time a step costs once whatever its plan (gradient reduction, optimizer step); 0 when unknown.
        It changes no decision, only the predicted step time (`Plan.meta["est_time_s"]`)."""
        return 0.0

    @abstractmethod
    def seq_time(self, s: int, d: int) -> float:
        """Seconds one sequence of `s` tokens adds to a group of `d` ranks."""

    def group_overhead_s(self, d: int) -> float:
        """Seconds a non-empty group of `d` ranks costs whatever it holds (0 by default)."""
        return 0.0

    def group_time(self, lengths: Sequence[int], d: int) -> float:
        """Seconds a group of `d` ranks needs for sequences of these `lengths` (0 when empty)."""
        b = self.group_breakdown(lengths, d)
        return b["compute_s"] + b["comm_s"]

    def micro_batch_time(self, groups: Sequence[tuple[int, Sequence[int]]]) -> float:
        """Seconds of one micro-batch whose groups are ``(size, lengths)`` pairs (empty groups cost nothing):
        ``fixed_s`` + the slowest group. What the planners minimise; the predicted step time sums it."""
        return self.fixed_s + max((self.group_time(ls, d) for d, ls in groups if ls), default=0.0)

    def group_breakdown(self, lengths: Sequence[int], d: int) -> dict[str, float]:
        """``{"compute_s", "comm_s"}`` (exposed communication) of one group; additive default."""
        if not lengths:
            return {"compute_s": 0.0, "comm_s": 0.0}
        total = self.group_overhead_s(d) + sum(self.seq_time(s, d) for s in lengths)
        comm = self.group_overhead_s(d) + sum(self.seq_comm(s, d) for s in lengths)
        return {"compute_s": total - comm, "comm_s": comm}

    def seq_comm(self, s: int, d: int) -> float:
        """The communication part of `seq_time` (0 by default)."""
        return 0.0

    def rank_time(self, s: int, d: int) -> float:
        """Rank-seconds a sequence uses on `d` ranks: d * seq_time(s, d) (what a lower bound sums)."""
        return d * self.seq_time(s, d)

    @abstractmethod
    def capacity(self, d: int) -> int:
        """Most tokens a group of `d` ranks can hold (activation memory)."""

    def memory_per_rank_gb(self, lengths: Sequence[int], d: int) -> float | None:
        """Estimated memory (GB) per rank of a group holding `lengths`, or None if unknown."""
        return None

    def describe(self) -> dict[str, Any]:
        """Where the numbers come from (for reports)."""
        return {"name": self.name}
