"""Pass recurrent states between the zigzag chunks of a group (REFERENCE.md section 5).

A segment's output is affine in the state entering it, so each rank scans
its segments from a zero state and reports per segment the total decay `a`
(the factor the entering state is multiplied by over the segment; diagonal,
so elementwise) and the end state `S`. After one all-gather of these
summaries, the state entering chunk c of a sequence is the fold over chunks
0..c-1 in chunk order (not rank order):
``S_in(0) = 0; S_in(c + 1) = a(c) * S_in(c) + S(c)``.
Summaries travel in fp32 (fp64 inputs stay fp64); complex states are sent as
real pairs.
"""

from __future__ import annotations

import torch

from hetsp.ssm_parallel.comm import GroupSpec, group_all_gather
from hetsp.layout import chunk_owner
from hetsp.ssm_parallel.segments import Segments, chunk_slot


def _summary_dtype(t: torch.Tensor) -> torch.dtype:
    if t.is_complex():
        return torch.complex128 if t.dtype == torch.complex128 else torch.complex64
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _from_real(t: torch.Tensor, complex_: bool) -> torch.Tensor:
    return torch.view_as_complex(t.contiguous()) if complex_ else t


def chunk_order(group_size: int) -> list[int]:
    """For chunk c = 0..2d-1, its index ``holder * 2 + slot`` in a gathered [d, 2] summary."""
    return [chunk_owner(c, group_size) * 2 + chunk_slot(c, group_size) for c in range(2 * group_size)]


def pass_states(decay: torch.Tensor, state: torch.Tensor, segments: Segments, group: GroupSpec) -> torch.Tensor:
    """States entering each local segment.

    decay: ``[num_segments, *A]`` with A a prefix of S (broadcast over the rest);
    state: ``[num_segments, *S]`` end state of each segment scanned from zero.
    Returns ``[num_segments, *S]`` in the summary dtype (fp32, fp64 or complex).
    Every rank of the group must call this, with the same shapes.
    """
    if decay.shape[0] != segments.num_segments or state.shape[0] != segments.num_segments:
        raise ValueError(
            f"pass_states: expected {segments.num_segments} segment summaries, got decay {tuple(decay.shape)}, "
            f"state {tuple(state.shape)}"
        )
    d = group.size
    num_seqs = segments.num_segments // 2
    s_dtype = _summary_dtype(state)
    a_dtype = _summary_dtype(decay)
    decay = decay.to(a_dtype)
    state = state.to(s_dtype)
    a_flat = _as_real(decay).reshape(segments.num_segments, -1)
    s_flat = _as_real(state).reshape(segments.num_segments, -1)
    wire = torch.promote_types(a_flat.dtype, s_flat.dtype)
    payload = torch.cat([a_flat.to(wire), s_flat.to(wire)], dim=1)
    gathered = group_all_gather(payload, group)  # [d, num_segments, F]
    width = payload.shape[1]
    by_chunk = gathered.view(d, num_seqs, 2, width).permute(1, 0, 2, 3).reshape(num_seqs, 2 * d, width)
    by_chunk = by_chunk[:, chunk_order(d)]  # [num_seqs, 2d, F] in chunk order
    na = a_flat.shape[1]
    a_shape = (num_seqs, 2 * d, *_as_real(decay).shape[1:])
    s_shape = (num_seqs, 2 * d, *_as_real(state).shape[1:])
    a_all = _from_real(by_chunk[..., :na].to(a_flat.dtype).reshape(a_shape), decay.is_complex())
    s_all = _from_real(by_chunk[..., na:].to(s_flat.dtype).reshape(s_shape), state.is_complex())
    a_all = a_all.reshape(*a_all.shape, *([1] * (s_all.dim() - a_all.dim())))
    incoming = [torch.zeros_like(s_all[:, 0])]
    for c in range(2 * d - 1):
        incoming.append(a_all[:, c] * incoming[-1] + s_all[:, c])
    incoming = torch.stack(incoming, dim=1)  # [num_seqs, 2d, *S]
    mine = [segments.seq[k] * 2 * d + segments.chunk[k] for k in range(segments.num_segments)]
    return incoming.reshape(num_seqs * 2 * d, *incoming.shape[2:])[mine]
