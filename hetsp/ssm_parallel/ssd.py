"""Mamba-2 (SSD) scan over a rank's zigzag segments, with state passing.

Per head h the state ``S_t [P, N]`` follows
``S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T`` and ``y_t = S_t C_t + D_h x_t``.
A segment scanned from zero misses ``exp(cumsum(dt A)_t) * (S_in C_t)``,
where S_in is the state entering it (`state.pass_states`); the segment's
decay is ``exp(sum(dt A))`` per head.
"""

from __future__ import annotations

from typing import Callable

import torch

from hetsp.ssm_parallel.comm import GroupSpec
from hetsp.ssm_parallel.segments import Segments
from hetsp.ssm_parallel.state import pass_states

# (x [L, H, P], dt [L, H], B [L, G, N], C [L, G, N]) -> (y [L, H, P], end state [H, P, N]), from a zero state.
LocalSSD = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def ssd_scan_sp(
    local_scan: LocalSSD,
    x_THP: torch.Tensor,
    dt_TH: torch.Tensor,
    A_H: torch.Tensor,
    B_TGN: torch.Tensor,
    C_TGN: torch.Tensor,
    segments: Segments,
    group: GroupSpec,
) -> torch.Tensor:
    """``[T, H, P]``: the SSD output of this rank's tokens as if every document were scanned whole.

    `dt_TH` is the effective step (after bias, softplus and clamping);
    `local_scan` is the single-process kernel (any of its implementations).
    Every rank of the group must call it.
    """
    num_tokens, num_heads, head_dim = x_THP.shape
    num_groups, d_state = C_TGN.shape[1], C_TGN.shape[2]
    if num_tokens != segments.num_tokens:
        raise ValueError(f"ssd_scan_sp: {num_tokens} local tokens, the layout says {segments.num_tokens}")
    if num_heads % num_groups:
        raise ValueError(f"ssd_scan_sp: {num_heads} heads are not divisible into {num_groups} B/C groups")
    dA_TH = dt_TH.to(torch.promote_types(dt_TH.dtype, torch.float32)) * A_H
    ys, ends, log_decays = [], [], []
    for off, n in zip(segments.offset, segments.length):
        sl = slice(off, off + n)
        if n:
            y, end = local_scan(x_THP[sl], dt_TH[sl], B_TGN[sl], C_TGN[sl])
        else:
            y = x_THP[sl].to(dA_TH.dtype)
            end = dA_TH.new_zeros((num_heads, head_dim, d_state))
        ys.append(y)
        ends.append(end)
        log_decays.append(dA_TH[sl].sum(0))
    s_in = pass_states(torch.stack(log_decays).exp(), torch.stack(ends), segments, group)  # [K, H, P, N]
    y0 = torch.cat([y.to(s_in.dtype) for y in ys], dim=0)
    return y0 + state_response(dA_TH, C_TGN, s_in, segments)


def state_response(dA_TH: torch.Tensor, C_TGN: torch.Tensor, s_in: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``[T, H, P]``: what the incoming states ``s_in [K, H, P, N]`` add to each segment's SSD output.

    ``exp(cumsum(dA)_t) * (s_in C_t)`` with the cumsum inside the token's segment; dA = dt * A.
    """
    num_heads = dA_TH.shape[1]
    C_THN = C_TGN.repeat_interleave(num_heads // C_TGN.shape[1], dim=1).to(s_in.dtype)
    out = []
    for k, (off, n) in enumerate(zip(segments.offset, segments.length)):
        sl = slice(off, off + n)
        decay_in = torch.cumsum(dA_TH[sl].to(s_in.dtype), dim=0).exp()  # [L, H]
        out.append(torch.einsum("lhn,hpn->lhp", C_THN[sl], s_in[k]) * decay_in[..., None])
    return torch.cat(out, dim=0)
