"""Response of a time-invariant diagonal SSM (S4D, MEGA's EMA) to the state entering each segment.

With ``h_t = A h_{t-1} + B u_t`` per channel h and mode n, a state ``S_in``
entering a segment adds ``sum_n C A^(j+1) S_in`` at the segment's j-th token.
Powers come from a table of A^1..A^Q and one factor A^(Q b) per block b of Q
tokens, so no per-token transcendental is evaluated.

Shapes: A, C ``[H, N]`` (complex for S4D, real for EMA); s_in ``[K, H, N]`` (K
segments); returns ``[T, H]`` in the dtype of A (the caller applies the kernel's
readout, e.g. 2 Re(.) for S4D's conjugate pairs).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from hetsp.ssm_parallel.segments import Segments

BLOCK = 64


@lru_cache(maxsize=64)
def _blocks(segments: Segments, block: int, device: torch.device):
    """Per block: (segment, index in segment); per token: its flat slot in [num_blocks * block]."""
    seg_of_block, index_in_seg, token_slot = [], [], []
    for k, n in enumerate(segments.length):
        first = len(seg_of_block)
        nb = -(-n // block)
        seg_of_block.extend([k] * nb)
        index_in_seg.extend(range(nb))
        token_slot.extend(first * block + j for j in range(n))
    as_long = dict(dtype=torch.long, device=device)
    return torch.tensor(seg_of_block, **as_long), torch.tensor(index_in_seg, **as_long), torch.tensor(token_slot, **as_long)


def lti_state_response(A: torch.Tensor, C: torch.Tensor, s_in: torch.Tensor, segments: Segments, block: int = BLOCK) -> torch.Tensor:
    """``[T, H]``: ``sum_n C[h, n] A[h, n]^(j+1) s_in[k, h, n]`` for the j-th token of segment k."""
    seg_of_block, index_in_seg, token_slot = _blocks(segments, block, A.device)
    log_a = torch.log(A)
    steps = torch.arange(1, block + 1, device=A.device, dtype=log_a.real.dtype)
    within = torch.exp(steps[:, None, None] * log_a[None]) * C  # [Q, H, N]: C A^(q+1)
    start = torch.exp((block * index_in_seg).to(steps.dtype)[:, None, None] * log_a[None]) * s_in.to(A.dtype)[seg_of_block]
    y = torch.einsum("qhn,bhn->bqh", within, start)  # [num_blocks, Q, H]
    return y.reshape(-1, A.shape[0])[token_slot]
