"""Single-head local softmax attention over a packed (activated-only) sequence.

Query i attends key j when i - W < j <= i and both carry the same segment id
(>= 0; -1 marks an empty slot). Optional prefix keys/values (the last activated
tokens of earlier shards or of the decoding cache) sit just before position 0.

Shapes: q, k (B, M, Z); v (B, M, E); seg (B, M) long; prefix_k (B, W', Z),
prefix_v (B, W', E), prefix_seg (B, W') with W' <= W (only the last W are read).
Returns o (B, M, E), zero for empty query slots.
"""

from __future__ import annotations

import torch


def _with_prefix(k, v, seg, prefix_k, prefix_v, prefix_seg, window):
    """Keys with exactly `window` prefix slots in front (empty slots when no prefix)."""
    batch, _, z = k.shape
    e = v.shape[-1]
    if prefix_k is None:
        pk, pv = k.new_zeros((batch, window, z)), v.new_zeros((batch, window, e))
        ps = seg.new_full((batch, window), -1)
    else:
        pk, pv, ps = prefix_k[:, -window:], prefix_v[:, -window:], prefix_seg[:, -window:]
        short = window - pk.shape[1]
        if short:
            pk = torch.cat([k.new_zeros((batch, short, z)), pk], 1)
            pv = torch.cat([v.new_zeros((batch, short, e)), pv], 1)
            ps = torch.cat([seg.new_full((batch, short), -1), ps], 1)
    return torch.cat([pk, k], 1), torch.cat([pv, v], 1), torch.cat([ps, seg], 1)


def _softmax_masked(scores, allowed):
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, -1)
    return torch.where(allowed.any(-1, keepdim=True), p, torch.zeros_like(p))


def _local_attention_tree(q, k, v, window, scale, prefix_k, tree, tree_index):
    """Stack-structured rows: slot i attends the last `window` activated ancestors-or-self of its token.

    tree: models.kernels.tree.StackTree; tree_index (B, M): flat token index of each packed slot (-1 empty).
    Dense over the M packed slots (the activated ancestors of a token may lie anywhere before it)."""
    if prefix_k is not None:
        raise NotImplementedError("a local-attention prefix (decoding cache) with stack-structured rows: decode them with models.backspace_decoding")
    tree.require_local("local_attention")
    anc = tree.visible(tree_index, tree_index)  # (B, M, M): key slot j is an ancestor-or-self of query slot i
    # Packed slots keep time order, so a query's activated ancestors from slot j on number the reversed cumsum.
    from_top = anc.flip(-1).to(torch.int32).cumsum(-1).flip(-1)
    allowed = anc & (from_top <= window)
    scores = torch.einsum("bqz,bkz->bqk", q, k) * scale
    return torch.einsum("bqk,bke->bqe", _softmax_masked(scores, allowed), v)


def _one_block(q, k, v, seg, window, scale):
    """No prefix and at most `window` slots: one (M, M) block instead of a padded (W, 2W) one."""
    m = q.shape[1]
    i = torch.arange(m, device=q.device)[:, None]
    j = torch.arange(m, device=q.device)[None, :]
    near = (j <= i) & (j > i - window)
    allowed = near & (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    scores = torch.einsum("bqz,bkz->bqk", q, k) * scale
    return torch.einsum("bqk,bke->bqe", _softmax_masked(scores, allowed), v)


def local_attention(q, k, v, seg, window, scale, prefix_k=None, prefix_v=None, prefix_seg=None, tree=None, tree_index=None):
    """Blocked version: query block b (W queries) reads key blocks b-1 and b, O(M W); a row of at
    most W slots is one (M, M) block, or one (M, W + M) block with a prefix.

    tree, tree_index: stack-structured rows (models.kernels.tree); None takes today's path."""
    if tree is not None:
        return _local_attention_tree(q, k, v, window, scale, prefix_k, tree, tree_index)
    batch, m, _ = q.shape
    if prefix_k is None and m <= window:
        return _one_block(q, k, v, seg, window, scale)
    if m <= window:
        # A prefix and few slots (a decoding step): one (M, W + M) block, not a padded (W, 2W) one.
        return local_attention_ref(q, k, v, seg, window, scale, prefix_k, prefix_v, prefix_seg)
    w = window
    kx, vx, sx = _with_prefix(k, v, seg, prefix_k, prefix_v, prefix_seg, w)
    nb = max((m + w - 1) // w, 1)
    pad = nb * w - m
    if pad:
        q = torch.cat([q, q.new_zeros((batch, pad, q.shape[-1]))], 1)
        seg = torch.cat([seg, seg.new_full((batch, pad), -1)], 1)
        kx = torch.cat([kx, kx.new_zeros((batch, pad, kx.shape[-1]))], 1)
        vx = torch.cat([vx, vx.new_zeros((batch, pad, vx.shape[-1]))], 1)
        sx = torch.cat([sx, sx.new_full((batch, pad), -1)], 1)
    qb = q.reshape(batch, nb, w, -1)
    kb = kx.unfold(1, 2 * w, w).transpose(-1, -2)  # (B, nb, 2W, Z): key slots [bW - W, bW + W)
    vb = vx.unfold(1, 2 * w, w).transpose(-1, -2)
    sk = sx.unfold(1, 2 * w, w)  # (B, nb, 2W)
    sq = seg.reshape(batch, nb, w)
    i = torch.arange(w, device=q.device)[:, None] + w  # query slot inside the 2W window
    j = torch.arange(2 * w, device=q.device)[None, :]
    near = (j <= i) & (j > i - w)
    allowed = near & (sq[..., :, None] == sk[..., None, :]) & (sq[..., :, None] >= 0)
    scores = torch.einsum("bnqz,bnkz->bnqk", qb, kb) * scale
    o = torch.einsum("bnqk,bnke->bnqe", _softmax_masked(scores, allowed), vb)
    return o.reshape(batch, nb * w, -1)[:, :m]


def local_attention_ref(q, k, v, seg, window, scale, prefix_k=None, prefix_v=None, prefix_seg=None, tree=None, tree_index=None):
    """Dense twin of `local_attention` (M x M scores with the window mask)."""
    if tree is not None:
        return _local_attention_tree(q, k, v, window, scale, prefix_k, tree, tree_index)
    m = q.shape[1]
    w = window
    kx, vx, sx = _with_prefix(k, v, seg, prefix_k, prefix_v, prefix_seg, w)
    i = torch.arange(m, device=q.device)[:, None] + w
    j = torch.arange(m + w, device=q.device)[None, :]
    near = (j <= i) & (j > i - w)
    allowed = near & (seg[:, :, None] == sx[:, None, :]) & (seg[:, :, None] >= 0)
    scores = torch.einsum("bqz,bkz->bqk", q, kx) * scale
    return torch.einsum("bqk,bke->bqe", _softmax_masked(scores, allowed), vx)
