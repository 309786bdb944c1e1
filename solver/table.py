"""Precomputed per-(length, degree) costs for one batch, the currency of the heuristics and the MILP.

`CostTable(lengths, degrees, cm)` evaluates ``cm.seq_time`` once per distinct
length and allowed degree. For a length that no allowed degree can hold,
`min_degree` is None (callers report it).
"""

from __future__ import annotations

from typing import Any, Sequence

from .costs.base import CostModel


class CostTable:
    """Costs of the batch `lengths` on groups whose sizes are in `degrees` (ascending, unique).

    Attributes: ``degrees`` (list[int]), ``cap[d]`` (tokens a group of d holds),
    ``time[i][d]`` seconds sequence i adds to a group of d (inf if it cannot fit),
    ``fixed`` per-micro-batch seconds, ``overhead[d]`` per-group seconds.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        degrees: Sequence[int],
        cm: CostModel,
        members: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """`members[i]`, when given, are the lengths of the sequences that item i stands for (a
        bundle kept in one group): the item holds their total tokens and costs the sum of their times."""
        self.lengths = list(lengths)
        self.degrees = sorted(set(int(d) for d in degrees))
        self.cm = cm
        self.cap = {d: cm.capacity(d) for d in self.degrees}
        self.fixed = cm.fixed_s
        self.overhead = {d: cm.group_overhead_s(d) for d in self.degrees}
        inf = float("inf")
        cache: dict[int, dict[int, float]] = {}
        bundle_rows: dict[tuple[int, ...], dict[int, float]] = {}
        self.time: list[dict[int, float]] = []
        self._keys: list[Any] = []
        for i, s in enumerate(self.lengths):
            parts = tuple(sorted(members[i])) if members is not None else (s,)
            if len(parts) > 1:
                if sum(parts) != s:
                    raise ValueError(f"item {i}: members {list(parts)} do not add up to its {s} tokens")
                row = bundle_rows.get(parts)
                if row is None:
                    row = {d: (sum(cm.seq_time(x, d) for x in parts) if s <= self.cap[d] else inf) for d in self.degrees}
                    bundle_rows[parts] = row
                self._keys.append(parts)
            else:
                row = cache.get(s)
                if row is None:
                    row = {d: (cm.seq_time(s, d) if s <= self.cap[d] else inf) for d in self.degrees}
                    cache[s] = row
                self._keys.append(s)
            self.time.append(row)
        self._rows = cache
        self._min_cache: dict[Any, tuple[float, float]] = {}

    def row(self, s: int) -> dict[int, float]:
        """Times of a length `s` (computed on demand for lengths outside the batch)."""
        r = self._rows.get(s)
        if r is None:
            inf = float("inf")
            r = {d: (self.cm.seq_time(s, d) if s <= self.cap[d] else inf) for d in self.degrees}
            self._rows[s] = r
        return r

    def min_degree(self, i: int) -> int | None:
        """Smallest allowed degree whose group can hold sequence i alone."""
        for d in self.degrees:
            if self.lengths[i] <= self.cap[d]:
                return d
        return None

    def min_time(self, i: int) -> float:
        """Least time of sequence i alone in any allowed group (inf when none holds it)."""
        return self._mins(i)[0]

    def min_rank_time(self, i: int) -> float:
        """Least rank-seconds of sequence i over the allowed degrees that hold it."""
        return self._mins(i)[1]

    def _mins(self, i: int) -> tuple[float, float]:
        key = self._keys[i]
        m = self._min_cache.get(key)
        if m is None:
            row = self.time[i]
            m = (min(self.overhead[d] + t for d, t in row.items()), min(d * t for d, t in row.items()))
            self._min_cache[key] = m
        return m
