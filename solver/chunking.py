"""Micro-batch count search and min-max contiguous chunking (FlexSP's split of a sorted batch)."""

from __future__ import annotations

import math
from typing import Sequence


def min_micro_batches(lengths: Sequence[int], tokens_per_micro_batch: int) -> int:
    """Fewest micro-batches whose memory can hold the batch: ceil(total tokens / tokens per micro-batch)."""
    if tokens_per_micro_batch < 1:
        raise ValueError(f"tokens_per_micro_batch must be >= 1, got {tokens_per_micro_batch}")
    return max(1, math.ceil(sum(lengths) / tokens_per_micro_batch))


def micro_batch_counts(m_min: int, extra: int = 4) -> list[int]:
    """The counts FlexSP tries: M_min .. M_min + extra."""
    return list(range(m_min, m_min + extra + 1))


def _cuts_needed(weights: Sequence[float], tokens: Sequence[int], limit: float, max_tokens: float) -> int | None:
    runs, w, t = 1, 0.0, 0
    for x, n in zip(weights, tokens):
        if x > limit or n > max_tokens:
            return None
        if w + x > limit or t + n > max_tokens:
            runs += 1
            w, t = 0.0, 0
        w += x
        t += n
    return runs


def min_max_chunks(
    weights: Sequence[float], num_chunks: int, tokens: Sequence[int] | None = None, max_tokens: float = math.inf
) -> list[tuple[int, int]] | None:
    """Cut items (in the given order) into at most `num_chunks` contiguous runs minimising the largest run weight.

    Each run may also be limited to `max_tokens` tokens. Returns ``[(start, stop), ...]``
    (half-open), or None when no split into `num_chunks` runs respects the token limit.
    Binary search on the threshold with a greedy check (exact for positive weights up to float precision).
    """
    n = len(weights)
    if n == 0:
        return []
    toks = list(tokens) if tokens is not None else [0] * n
    lo, hi = max(weights), sum(weights)
    if _cuts_needed(weights, toks, hi, max_tokens) is None or _cuts_needed(weights, toks, hi, max_tokens) > num_chunks:
        return None
    for _ in range(100):
        mid = (lo + hi) / 2
        k = _cuts_needed(weights, toks, mid, max_tokens)
        if k is not None and k <= num_chunks:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    out, start, w, t = [], 0, 0.0, 0
    for i, (x, m) in enumerate(zip(weights, toks)):
        if w + x > hi or t + m > max_tokens:
            out.append((start, i))
            start, w, t = i, 0.0, 0
        w += x
        t += m
    out.append((start, n))
    return out
