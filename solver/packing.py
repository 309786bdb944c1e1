"""Best-fit decreasing bin packing of sequences under a token budget."""

from __future__ import annotations

import bisect
from typing import Sequence


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack sequence indices into bins of at most `capacity` tokens.

    Sequences are taken longest first; each goes into the fullest bin that
    still has room, else a new bin. Returns bins (lists of indices into
    `lengths`), in order of creation. Every length must be <= capacity.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (remaining capacity, bin id) kept sorted so the best fit is a bisect away.
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sequence {i} ({n} tokens) is larger than the bin capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        else:
            b = len(bins)
            bins.append([i])
            room = capacity - n
        bisect.insort(free, (room, b))
    return bins
