"""Which group sizes a planner considers."""

from __future__ import annotations

import logging
from typing import Sequence

log = logging.getLogger("solver")
_said: set[tuple] = set()


def allowed_degrees(allowed: Sequence[int], num_ranks: int) -> list[int]:
    """The allowed group sizes that fit in `num_ranks` (empty `allowed`: every size 1..num_ranks)."""
    if not allowed:
        return list(range(1, num_ranks + 1))
    bad = [d for d in allowed if int(d) != d or d < 1]
    if bad:
        raise ValueError(f"planner.allowed_group_sizes must hold positive integers, got {bad}")
    out = sorted({int(d) for d in allowed if d <= num_ranks})
    if not out:
        raise ValueError(
            f"no allowed group size fits in {num_ranks} ranks (planner.allowed_group_sizes = {list(allowed)})"
        )
    return out


def candidate_degrees(allowed: Sequence[int], num_ranks: int, max_count: int = 40, ranks_per_node: int = 0) -> list[int]:
    """A subset of the allowed sizes small enough to tabulate: all of them when at most `max_count`.

    Otherwise every allowed size up to 8, then sizes about 19% apart
    (geometric), the node size and the largest, so heuristics stay fast at
    1024 ranks. Logged once per (count, world).
    """
    degs = allowed_degrees(allowed, num_ranks)
    if len(degs) <= max_count:
        return degs
    keep = {d for d in degs if d <= 8} | {degs[0], degs[-1]}
    if ranks_per_node in degs:
        keep.add(ranks_per_node)
    ratio = (degs[-1] / 8) ** (1 / max(1, max_count - len(keep) - 1)) if degs[-1] > 8 else 2.0
    target = 8.0
    for d in degs:
        if d >= target:
            keep.add(d)
            target = d * ratio
    out = sorted(keep)
    key = (len(degs), num_ranks, len(out))
    if key not in _said:
        _said.add(key)
        log.info("considering %d of the %d allowed group sizes on %d ranks: %s", len(out), len(degs), num_ranks, out)
    return out
