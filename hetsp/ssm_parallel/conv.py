"""Causal depthwise convolution over a rank's zigzag segments, with halos.

Each local segment needs the k-1 tokens of its document just before it.
They usually sit at the end of the previous chunk, on the rank holding it;
when chunks are shorter than k-1 tokens they span several chunks and ranks,
so the routes (`segments.halo_routes`) name every source token exactly.
The halo rows arrive point to point, their gradients go back the same way,
and rows before a document start are zero.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from hetsp.ssm_parallel.comm import GroupSpec, halo_exchange
from hetsp.ssm_parallel.segments import Segments, halo_routes


@lru_cache(maxsize=64)
def _extended_index(segments: Segments, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices building [halo(width), tokens] per segment from cat(halo rows, tokens), and of the outputs."""
    num_rows = segments.num_segments * width
    build, pick = [], []
    for k in range(segments.num_segments):
        off, n = segments.offset[k], segments.length[k]
        base = len(build)
        build.extend(range(k * width, (k + 1) * width))
        build.extend(range(num_rows + off, num_rows + off + n))
        # The output at extended position e uses rows e-width..e: index e - width of a valid conv.
        pick.extend(range(base, base + n))
    return torch.tensor(build, dtype=torch.long, device=device), torch.tensor(pick, dtype=torch.long, device=device)


def causal_conv1d_sp(
    x_TC: torch.Tensor,
    weight_CK: torch.Tensor,
    bias_C: torch.Tensor | None,
    segments: Segments,
    group: GroupSpec,
) -> torch.Tensor:
    """Causal depthwise conv of the local tokens ``x_TC [T, C]`` with ``weight_CK [C, K]``: ``[T, C]``.

    Equals the conv of every whole document restricted to this rank's tokens
    (no activation applied). Every rank of the group must call it.
    """
    if x_TC.shape[0] != segments.num_tokens:
        raise ValueError(f"causal_conv1d_sp: {x_TC.shape[0]} local tokens, the layout says {segments.num_tokens}")
    num_ch, k = weight_CK.shape
    width = k - 1
    x_TC = x_TC.to(weight_CK.dtype)
    halo = halo_exchange(x_TC, halo_routes(segments.lengths, group.size, group.rank, width), group)
    build, pick = _extended_index(segments, width, x_TC.device)
    ext = torch.cat([halo, x_TC], dim=0)[build]  # [R + T, C]
    if ext.shape[0] < k:  # no tokens and no halo rows: give conv1d a valid (unused) input
        ext = torch.cat([ext, ext.new_zeros((k - ext.shape[0], num_ch))])
    out = F.conv1d(ext.t().unsqueeze(0), weight_CK.unsqueeze(1), bias_C, groups=num_ch)  # [1, C, R + T - width]
    return out[0].t()[pick]
