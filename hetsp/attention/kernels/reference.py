"""Plain-torch block kernel (the reference twin of every fast kernel) and full varlen attention.

Legend: T tokens, H query heads, K kv heads, D head dim. Works in any float dtype and
computes in the accumulation dtype (float64 for float64 inputs, else float32).
Causal alignment: bottom-right (query i of a segment with nq queries and nk keys sees
keys j <= i + nk - nq), like flash-attn. Implements both score modifiers of `base`
(sliding window by global positions, logit softcapping).
"""

from __future__ import annotations

import torch

from .base import BlockKernel, Lifetimes, Segments, acc_dtype, reduce_kv, repeat_kv, softcap_scores, window_visible


def _mask(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """(nq, nk) bool, True where the key is visible (bottom-right causal)."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i + (nk - nq)


def _scores(q, k, seg: Segments, bounds, causal: bool, scale: float, window, softcap, visible=None):
    """Masked (H, nq, nk) scores of one segment and the softcap's tanh (None without a cap)."""
    a, b, c, e = bounds
    s = (q @ k.transpose(1, 2)) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = t * softcap
    if window is not None:
        q_pos, k_pos = seg.device_pos(q.device)
        s = s.masked_fill(~window_visible(q_pos[a:b], k_pos[c:e], window), float("-inf"))
    elif causal:
        s = s.masked_fill(~_mask(b - a, e - c, q.device), float("-inf"))
    if visible is not None:
        s = s.masked_fill(~visible.allowed(a, b, c, e), float("-inf"))
    return s, t


def block_forward_ref(q_THD, k_TKD, v_TKD, seg: Segments, causal: bool, scale: float, visible: Lifetimes | None = None, *,
                      window=None, softcap=None):
    """Block attention per segment: (out (Tq, H, D) in q's dtype, lse (Tq, H) in acc dtype).

    `visible`: optional lifetime mask (base.Lifetimes), applied on top of `causal`."""
    acc = acc_dtype(q_THD.dtype)
    num_heads = q_THD.shape[1]
    out = torch.empty(q_THD.shape, dtype=acc, device=q_THD.device)
    lse = torch.empty(q_THD.shape[:2], dtype=acc, device=q_THD.device)
    for a, b, c, e in zip(seg.cu_q, seg.cu_q[1:], seg.cu_k, seg.cu_k[1:]):
        q = q_THD[a:b].to(acc).transpose(0, 1)  # H, nq, D
        k = repeat_kv(k_TKD[c:e], num_heads).to(acc).transpose(0, 1)
        v = repeat_kv(v_TKD[c:e], num_heads).to(acc).transpose(0, 1)
        s, _ = _scores(q, k, seg, (a, b, c, e), causal, scale, window, softcap, visible)
        l = torch.logsumexp(s, dim=-1)  # H, nq; -inf for a row that sees no key (then p = 0, out = 0)
        p = torch.exp(s - torch.where(torch.isfinite(l), l, 0.0)[..., None])
        out[a:b] = (p @ v).transpose(0, 1)
        lse[a:b] = l.transpose(0, 1)
    return out.to(q_THD.dtype), lse


def block_backward_ref(dout_THD, q_THD, k_TKD, v_TKD, out_THD, lse_TH, seg: Segments, causal: bool, scale: float,
                       visible: Lifetimes | None = None, *, window=None, softcap=None):
    """Gradients of a block given the final merged `out` and `lse`: (dq, dk, dv) in acc dtype.

    P = exp(S - lse), dV = P^T dO, dP = dO V^T, D = rowsum(dO * O), dS = P (dP - D);
    with a softcap, dS is multiplied by the tanh's derivative 1 - tanh^2.
    """
    acc = acc_dtype(q_THD.dtype)
    num_heads, num_kv = q_THD.shape[1], k_TKD.shape[1]
    dq = torch.zeros(q_THD.shape, dtype=acc, device=q_THD.device)
    dk = torch.zeros((k_TKD.shape[0], num_heads, k_TKD.shape[2]), dtype=acc, device=q_THD.device)
    dv = torch.zeros_like(dk)
    for a, b, c, e in zip(seg.cu_q, seg.cu_q[1:], seg.cu_k, seg.cu_k[1:]):
        q = q_THD[a:b].to(acc).transpose(0, 1)
        k = repeat_kv(k_TKD[c:e], num_heads).to(acc).transpose(0, 1)
        v = repeat_kv(v_TKD[c:e], num_heads).to(acc).transpose(0, 1)
        do = dout_THD[a:b].to(acc).transpose(0, 1)
        o = out_THD[a:b].to(acc).transpose(0, 1)
        s, t = _scores(q, k, seg, (a, b, c, e), causal, scale, window, softcap, visible)
        lse = lse_TH[a:b].to(acc).transpose(0, 1)
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        dv[c:e] = (p.transpose(1, 2) @ do).transpose(0, 1)
        dp = do @ v.transpose(1, 2)
        ds = p * (dp - (do * o).sum(-1, keepdim=True))
        if t is not None:
            ds = ds * (1 - t * t)
        dq[a:b] = (ds @ k).transpose(0, 1) * scale
        dk[c:e] = (ds.transpose(1, 2) @ q).transpose(0, 1) * scale
    return dq, reduce_kv(dk, num_kv), reduce_kv(dv, num_kv)


REFERENCE_KERNEL = BlockKernel(
    name="reference",
    forward=block_forward_ref,
    backward=block_backward_ref,
    causal_alignment="bottom_right",
    note="plain torch, per segment, float64-capable",
    lifetime_mask=True,
    score_modifiers=frozenset({"window", "softcap"}),
)


def varlen_attention_ref(q_THD, k_TKD, v_TKD, cu_seqlens, causal: bool = True, softmax_scale: float | None = None, *, window=None, softcap=None):
    """Full attention over packed sequences with autograd (single process; the tests' ground truth).

    q (T, H, D), k/v (T, K, D), cu_seqlens: ints or tensor, len = num sequences + 1.
    `window` (keys visible, self included; needs causal) and `softcap` as in `base`.
    Returns (T, H, D) in q's dtype, computed in the accumulation dtype.
    """
    cu = [int(x) for x in cu_seqlens]
    scale = softmax_scale if softmax_scale is not None else q_THD.shape[-1] ** -0.5
    acc = acc_dtype(q_THD.dtype)
    num_heads = q_THD.shape[1]
    outs = []
    for a, b in zip(cu, cu[1:]):
        if b == a:
            continue
        q = q_THD[a:b].to(acc).transpose(0, 1)
        k = repeat_kv(k_TKD[a:b], num_heads).to(acc).transpose(0, 1)
        v = repeat_kv(v_TKD[a:b], num_heads).to(acc).transpose(0, 1)
        s = softcap_scores((q @ k.transpose(1, 2)) * scale, softcap)
        if causal:
            s = s.masked_fill(~_mask(b - a, b - a, q.device), float("-inf"))
        if window is not None:
            pos = torch.arange(b - a, device=q.device)
            s = s.masked_fill(~window_visible(pos, pos, window), float("-inf"))
        outs.append((torch.softmax(s, -1) @ v).transpose(0, 1))
    return torch.cat(outs).to(q_THD.dtype)
