"""Which query rows meet which key rows at each step of the ring (from layouts).

At step t, rank r holds the K/V block of rank src = (r - t) mod d. Under the zigzag
layout (hetsp/layout.py) a causal ring has three kinds of blocks:
  t = 0:      local queries against local keys, causal (local order is position order);
  src < r:    every local query sees only chunk `src` (the first half) of the visiting block;
  src > r:    only local chunk 2d-1-r (the second half) sees the whole visiting block.
Both off-diagonal kinds are full (unmasked) blocks. Segments where either side is empty
are dropped so that no empty block reaches a kernel.

With a sliding window w (query at position p sees keys at p-w+1..p), each segment keeps
only the query rows that see at least one of its keys and the keys that at least one of
its queries sees (from global positions); a block left with no segment is skipped (its
K/V still travel on). The block then carries its rows' positions for the kernel's mask.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from hetsp.layout import ShardLayout

from .kernels.base import Segments


@dataclass
class RingStep:
    """One block of the ring for one rank.

    src:     rank in group whose K/V block is visiting.
    q_rows:  local query rows taking part (None: all rows, in order).
    k_rows:  rows of the visiting block taking part (None: all of them).
    seg:     matching query/key segments over the selected rows.
    causal:  whether the block is masked (only the diagonal block).
    """

    src: int
    q_rows: tuple[int, ...] | None
    k_rows: tuple[int, ...] | None
    seg: Segments
    causal: bool
    _device_rows: dict = field(default_factory=dict, repr=False)

    @property
    def empty(self) -> bool:
        return self.seg.num_segments == 0

    def rows(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(q_rows, k_rows) as int64 tensors on `device` (None for 'all rows'), cached."""
        key = str(device)
        if key not in self._device_rows:
            self._device_rows[key] = tuple(
                None if r is None else torch.tensor(r, dtype=torch.long, device=device) for r in (self.q_rows, self.k_rows)
            )
        return self._device_rows[key]


def _pieces(lay: ShardLayout, which: str) -> list[tuple[int, int]]:
    """Per sequence, (local offset, length) of the whole local part, the first or second half."""
    out = []
    for i in range(lay.num_sequences):
        p0, p1 = 2 * i, 2 * i + 1
        if which == "all":
            out.append((lay.cu_seqlens[i], lay.local_lengths[i]))
        elif which == "first":
            out.append((lay.piece_offsets[p0], lay.piece_lengths[p0]))
        else:
            out.append((lay.piece_offsets[p1], lay.piece_lengths[p1]))
    return out


def _in_window(rows: list[int], pos, lo_of, hi_of, other: list[int]) -> list[int]:
    """The rows r with some position of the sorted `other` in [lo_of(pos[r]), hi_of(pos[r])]."""
    return [r for r in rows if bisect.bisect_right(other, hi_of(pos[r])) > bisect.bisect_left(other, lo_of(pos[r]))]


def _block(src: int, q_parts, k_parts, causal: bool, num_q: int, num_k: int, window=None, q_lay=None, k_lay=None) -> RingStep:
    q_rows: list[int] = []
    k_rows: list[int] = []
    cu_q, cu_k = [0], [0]
    for (qo, qn), (ko, kn) in zip(q_parts, k_parts):
        if qn == 0 or kn == 0:
            continue
        qs, ks = list(range(qo, qo + qn)), list(range(ko, ko + kn))
        if window is not None:
            # local order is position order within a sequence, so these position lists are sorted
            qp, kp = q_lay.positions, k_lay.positions
            k_sorted = [kp[j] for j in ks]
            q_sorted = [qp[i] for i in qs]
            qs, ks = (
                _in_window(qs, qp, lambda p: p - window + 1, lambda p: p, k_sorted),
                _in_window(ks, kp, lambda p: p, lambda p: p + window - 1, q_sorted),
            )
            if not qs:
                continue
        q_rows.extend(qs)
        k_rows.extend(ks)
        cu_q.append(cu_q[-1] + len(qs))
        cu_k.append(cu_k[-1] + len(ks))
    qr = None if len(q_rows) == num_q else tuple(q_rows)
    kr = None if len(k_rows) == num_k else tuple(k_rows)
    seg = Segments(tuple(cu_q), tuple(cu_k))
    if window is not None:
        seg = Segments(tuple(cu_q), tuple(cu_k), q_pos=tuple(q_lay.positions[i] for i in q_rows), k_pos=tuple(k_lay.positions[j] for j in k_rows))
    return RingStep(src=src, q_rows=qr, k_rows=kr, seg=seg, causal=causal)


def ring_steps(layouts: list[ShardLayout], rank: int, causal: bool, window: int | None = None) -> list[RingStep]:
    """The d blocks rank `rank` computes, step 0 first (`layouts`: every rank's layout).

    `window`: sliding window (keys visible per query, itself included; causal only), or None.
    """
    if window is not None and not causal:
        raise ValueError("a sliding window is defined here for causal attention only; pass causal=True or no window")
    d = len(layouts)
    me = layouts[rank]
    steps = []
    for t in range(d):
        src = (rank - t) % d
        other = layouts[src]
        if t == 0:
            q, k, blk_causal = _pieces(me, "all"), _pieces(me, "all"), causal
        elif not causal:
            q, k, blk_causal = _pieces(me, "all"), _pieces(other, "all"), False
        elif src < rank:
            q, k, blk_causal = _pieces(me, "all"), _pieces(other, "first"), False
        else:
            q, k, blk_causal = _pieces(me, "second"), _pieces(other, "all"), False
        steps.append(_block(src, q, k, blk_causal, me.num_tokens, other.num_tokens, window, me, other))
    return steps
