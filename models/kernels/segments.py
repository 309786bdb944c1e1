"""Chunk layout of packed rows: every chunk holds tokens of exactly one segment.

A segment is one document (a slice of a row given by ``cu_seqlens``) or, without
``cu_seqlens``, one whole batch row. Each segment is left-padded with zeros to a
multiple of the chunk size Q, so a segment always ends on a chunk boundary and no
chunk mixes two segments: chunked scans then need no masks inside a chunk, and a
segment's final state is the state at the end of its last chunk.

Legend: B rows, L tokens per row, S segments, C chunks, Q chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkLayout:
    num_segments: int
    num_chunks: int
    chunk_size: int
    max_chunks: int  # most chunks of one segment
    gather_src: torch.Tensor  # (C*Q,) flat token index per padded slot; B*L marks a pad slot
    scatter_src: torch.Tensor  # (B*L,) padded slot of every token
    seg_lengths: torch.Tensor  # (S,) tokens per segment
    seg_num_chunks: torch.Tensor  # (S,)
    seg_first_chunk: torch.Tensor  # (S,) index of a segment's first chunk
    seg_pad: torch.Tensor  # (S,) zeros in front of the segment's first chunk
    grid_chunk: torch.Tensor  # (S, max_chunks) chunk index of the k-th chunk of each segment (clamped)

    def to_chunks(self, t_flat: torch.Tensor) -> torch.Tensor:
        """(B*L, *F) -> (C, Q, *F), zeros in pad slots."""
        padded = torch.cat([t_flat, t_flat.new_zeros((1,) + t_flat.shape[1:])], 0)
        out = padded.index_select(0, self.gather_src)
        return out.reshape((self.num_chunks, self.chunk_size) + t_flat.shape[1:])

    def from_chunks(self, t_chunks: torch.Tensor) -> torch.Tensor:
        """(C, Q, *F) -> (B*L, *F)."""
        flat = t_chunks.reshape((-1,) + t_chunks.shape[2:])
        return flat.index_select(0, self.scatter_src)

    def last_chunk(self) -> torch.Tensor:
        """(S,) index of each segment's last chunk (-1 for an empty segment)."""
        return self.seg_first_chunk + self.seg_num_chunks - 1


def segment_bounds(batch: int, length: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """Flat boundaries (S+1,) of the segments of a (batch, length) input."""
    if cu_seqlens is None:
        return torch.arange(batch + 1, device=device, dtype=torch.long) * length
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a batch of one packed row, got batch size {batch}")
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if cu.ndim != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != length:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor starting at 0 and ending at the row length {length}, got {cu.tolist()}"
        )
    return cu


def segment_ids(batch: int, length: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """(B, L) segment index of every token (rows count as segments without cu_seqlens)."""
    if cu_seqlens is None:
        return torch.arange(batch, device=device)[:, None].expand(batch, length)
    bounds = segment_bounds(batch, length, cu_seqlens, device)
    lengths = bounds[1:] - bounds[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)[None]


def positions_in_segment(batch: int, length: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """(B, L) index of every token inside its segment."""
    if cu_seqlens is None:
        return torch.arange(length, device=device)[None].expand(batch, length)
    bounds = segment_bounds(batch, length, cu_seqlens, device)
    seg = segment_ids(1, length, cu_seqlens, device)[0]
    return (torch.arange(length, device=device) - bounds[seg])[None]


def chunk_layout(batch: int, length: int, cu_seqlens: torch.Tensor | None, chunk_size: int, device) -> ChunkLayout:
    bounds = segment_bounds(batch, length, cu_seqlens, device)
    q = chunk_size
    lengths = bounds[1:] - bounds[:-1]
    num_segments = lengths.numel()
    nch = (lengths + q - 1) // q
    first = torch.cumsum(nch, 0) - nch
    pad = nch * q - lengths
    num_chunks = int(nch.sum())
    max_chunks = int(nch.max()) if num_segments else 0
    total = batch * length
    if num_chunks == 0:
        gather = torch.empty(0, dtype=torch.long, device=device)
    else:
        chunk_seg = torch.repeat_interleave(torch.arange(num_segments, device=device), nch)
        slot = torch.arange(num_chunks * q, device=device)
        seg = chunk_seg[slot // q]
        local = slot - first[seg] * q - pad[seg]
        gather = torch.where(local >= 0, bounds[seg] + local, torch.full_like(local, total))
    tokens = torch.arange(total, device=device)
    tok_seg = torch.repeat_interleave(torch.arange(num_segments, device=device), lengths)
    scatter = first[tok_seg] * q + pad[tok_seg] + (tokens - bounds[tok_seg])
    k = torch.arange(max(max_chunks, 1), device=device)
    grid = (first[:, None] + k[None]).clamp(max=max(num_chunks - 1, 0))
    return ChunkLayout(num_segments, num_chunks, q, max_chunks, gather, scatter, lengths, nch, first, pad, grid)
