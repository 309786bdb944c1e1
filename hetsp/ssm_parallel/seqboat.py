"""SeqBoat's local attention over the activated tokens of a group's zigzag shards.

A query attends to the last W activated tokens of its document (itself
included). Under the zigzag layout those may lie on any earlier chunk, on any
rank, and a chunk may activate fewer than W tokens; so every rank sends, per
local chunk, the keys/values of its last W activated tokens (a fixed-shape
payload: W slots with a validity flag), and each chunk takes the last W valid
ones of all earlier chunks of its document, in chunk order, as its prefix.
Gradients of the prefix keys/values go back through the gather.

Legend: S local segments (chunks), M packed activated tokens, W window,
Z query/key width, E value width.
"""

from __future__ import annotations

import torch

from hetsp.layout import zigzag_chunk_bounds
from hetsp.ssm_parallel.comm import group_all_gather
from hetsp.ssm_parallel.state import chunk_order


def _tails(k, v, seg, num_segments: int, window: int):
    """Per segment the last `window` activated (k, v), right-aligned: ([S, W, Z], [S, W, E], valid [S, W])."""
    ids = torch.arange(num_segments, device=seg.device)
    member = seg[0][None, :] == ids[:, None]  # [S, M]
    # Rank of each member from the end of its segment: 0 for the last activated token.
    from_end = member.flip(1).cumsum(1).flip(1) - 1
    keep = member & (from_end < window)
    dest = (window - 1 - from_end).clamp(min=0)  # right-aligned slot
    tk = k.new_zeros((num_segments, window, k.shape[-1]))
    tv = v.new_zeros((num_segments, window, v.shape[-1]))
    valid = torch.zeros((num_segments, window), dtype=torch.bool, device=seg.device)
    s_idx, t_idx = keep.nonzero(as_tuple=True)
    d_idx = dest[s_idx, t_idx]
    tk = tk.index_put((s_idx, d_idx), k[0][t_idx])
    tv = tv.index_put((s_idx, d_idx), v[0][t_idx])
    valid = valid.index_put((s_idx, d_idx), torch.ones_like(s_idx, dtype=torch.bool))
    return tk, tv, valid


def longest_chunk(segments) -> int:
    """Tokens of the longest zigzag chunk of any sequence of the group (the same on every rank)."""
    return max(b - a for n in segments.lengths for a, b in zigzag_chunk_bounds(n, segments.group_size))


def local_attention_group(inner, active):
    """The group version of the kernel ``inner(q, k, v, seg, window, scale, prefix_k, prefix_v, prefix_seg)``.

    `active()` returns (Segments, GroupSpec) while the group path is on, else None (then `inner`
    runs as is). On: q, k ``[1, M, Z]``, v ``[1, M, E]``, seg ``[1, M]`` the local segment of each
    packed activated token (-1 for an empty slot), packed in local order. Returns ``[1, M, E]``.
    """
    def local_attention(q, k, v, seg, window, scale, prefix_k=None, prefix_v=None, prefix_seg=None, **kw):
        act = active()
        if act is None:
            return inner(q, k, v, seg, window, scale, prefix_k=prefix_k, prefix_v=prefix_v, prefix_seg=prefix_seg, **kw)
        if prefix_k is not None:
            raise ValueError(
                "local_attention under sequence parallelism: decoding state (cache) is not supported; run the "
                "sharded forward with use_cache=False"
            )
        segments, group = act
        if q.shape[0] != 1:
            raise ValueError(f"local_attention under sequence parallelism takes one packed row, got batch {q.shape[0]}")
        S, d, z, e = segments.num_segments, group.size, k.shape[-1], v.shape[-1]
        num_seqs = S // 2
        # A chunk activates at most as many tokens as it holds: tails of min(W, longest chunk of the
        # group) slots lose nothing, and every rank of the group derives the same size.
        tail = min(window, longest_chunk(segments))
        tk, tv, valid = _tails(k, v, seg, S, tail)
        payload = torch.cat([tk, tv, valid[..., None].to(tk.dtype)], -1)  # [S, tail, Z + E + 1]
        gathered = group_all_gather(payload, group)  # [d, S, tail, F]
        by_chunk = gathered.view(d, num_seqs, 2, tail, -1).permute(1, 0, 2, 3, 4).reshape(num_seqs, 2 * d, tail, -1)
        by_chunk = by_chunk[:, chunk_order(d)]  # [num_seqs, 2d, tail, F], chunk order
        # Segment s (sequence i, chunk c) sees the tails of chunks 0..c-1 of sequence i.
        cand = by_chunk[list(segments.seq)]  # [S, 2d, tail, F]
        before = torch.arange(2 * d, device=q.device)[None, :] < torch.tensor(segments.chunk, device=q.device)[:, None]
        cand = cand.reshape(S, 2 * d * tail, -1)
        cand_valid = (cand[..., -1] > 0.5) & before.repeat_interleave(tail, 1)
        # P prefix slots per segment hold every valid candidate a window can reach (at most W of them).
        P = min(window, 2 * d * tail)
        order = torch.argsort(cand_valid.to(torch.int8), dim=1, stable=True)[:, -P:]  # last P valid, in order
        pick = torch.gather(cand, 1, order[..., None].expand(-1, -1, cand.shape[-1]))
        p_valid = torch.gather(cand_valid, 1, order)
        # One extended row: each segment's P prefix slots just before its own activated tokens (packed
        # order is segment order; valid slots right-aligned), so the window of a query reaches its
        # prefix and nothing else.
        m = seg.shape[1]
        ok = seg[0] >= 0
        seg_tok = seg[0].clamp(min=0)
        counts = torch.bincount(seg_tok[ok], minlength=S)
        starts = torch.cumsum(counts, 0) - counts
        packed = torch.arange(m, device=q.device)
        tok_pos = torch.where(ok, packed + P * (seg_tok + 1), packed + S * P)
        seg_ids = torch.arange(S, device=q.device)
        pre_pos = ((starts + seg_ids * P)[:, None] + torch.arange(P, device=q.device)[None]).reshape(-1)
        pre_seg = torch.where(p_valid, seg_ids[:, None].to(seg.dtype), torch.full_like(p_valid, -1, dtype=seg.dtype))
        ext_len = m + S * P

        def extend(t, prefix):
            ext = t.new_zeros((ext_len, t.shape[-1])).index_put((tok_pos,), t[0])
            return ext.index_put((pre_pos,), prefix.reshape(-1, t.shape[-1]).to(t.dtype))[None]

        ext_seg = seg.new_full((ext_len,), -1).index_put((tok_pos,), seg[0]).index_put((pre_pos,), pre_seg.reshape(-1))
        o = inner(
            extend(q, torch.zeros_like(pick[..., :z])), extend(k, pick[..., :z]), extend(v, pick[..., z : z + e]),
            ext_seg[None], window, scale, **kw,
        )
        return o[:, tok_pos]

    return local_attention
