"""Exact ring attention over packed variable-length sequences for one group of ranks.

Legend: T local tokens, H query heads, K kv heads (circulated un-repeated), D head dim.
Forward: K/V blocks travel the ring; the next step's exchange is posted before the
current block is computed; block results merge online in the accumulation dtype
(float32, or float64 for float64 inputs) with the stable form of REFERENCE.md s.1:
    O <- O - sigmoid(lse_b - lse) (O - O_b),  lse <- lse - logsigmoid(lse - lse_b).
Backward: K/V travel again; every block's backward gets the final merged O and lse;
dK/dV accumulate in the accumulation dtype while they travel with their block, and one
more hop brings them home.
Score modifiers (sliding window, logit softcapping; kernels/base.py) reach every block
kernel call as keywords, passed only when set; with a window, blocks whose keys lie
outside every local query's window are skipped (steps.py).
"""

from __future__ import annotations

import torch

from .comm import TAG_DKV, TAG_KV, RingExchange
from .context import ShardContext
from .kernels import acc_dtype
from .kernels.reference import REFERENCE_KERNEL


def _take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x.index_select(0, idx)


def _merge(out_THD, lse_TH, rows, o_b, lse_b) -> None:
    """Merge a block's (o_b, lse_b) into the running (out, lse) at `rows` (in place)."""
    o, l = _take(out_THD, rows), _take(lse_TH, rows)
    o_b = o_b.to(o.dtype)
    seen = torch.isfinite(l)
    useful = torch.isfinite(lse_b)
    w = torch.where(useful, torch.sigmoid(lse_b - l), torch.zeros_like(l))  # l = -inf gives w = 1
    new_o = torch.where(useful[..., None], o - w[..., None] * (o - o_b), o)
    new_l = torch.where(useful, torch.where(seen, l - torch.nn.functional.logsigmoid(l - lse_b), lse_b), l)
    if rows is None:
        out_THD.copy_(new_o)
        lse_TH.copy_(new_l)
    else:
        out_THD.index_copy_(0, rows, new_o)
        lse_TH.index_copy_(0, rows, new_l)


def _kv_shape(ctx: ShardContext, src: int, k: torch.Tensor) -> tuple[int, ...]:
    return (2, ctx.layouts[src].num_tokens, k.shape[1], k.shape[2])


def _modifiers(window, softcap) -> dict:
    """The kernels' score-modifier keywords that are set (none: plain attention)."""
    return {name: value for name, value in (("window", window), ("softcap", softcap)) if value is not None}


def ring_forward(q, k, v, ctx: ShardContext, causal: bool, scale: float, kernel, window=None, softcap=None):
    """(out (T, H, D) acc dtype, lse (T, H) acc dtype)."""
    acc = acc_dtype(q.dtype)
    d, r = ctx.group_size, ctx.rank_in_group
    ring = RingExchange(ctx.group_start, d, r)
    steps = ctx.steps(causal, window)
    lifetimes = ctx.lifetimes(causal, q.device, window)
    mods = _modifiers(window, softcap)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    for t, step in enumerate(steps):
        pending = ring.start(kv, _kv_shape(ctx, steps[t + 1].src, k), TAG_KV) if t + 1 < d else None
        life, useful = lifetimes[t]
        if useful:
            q_rows, k_rows = step.rows(q.device)
            kb = _take(kv[0], k_rows)
            vb = _take(kv[1], k_rows)
            extra = mods if life is None else dict(mods, visible=life)
            o_b, lse_b = kernel.forward(_take(q, q_rows), kb, vb, step.seg, step.causal, scale, **extra)
            if t == 0 and q_rows is None:  # the first block covers every row: nothing to merge yet
                out.copy_(o_b)
                lse.copy_(lse_b)
            else:
                _merge(out, lse, q_rows, o_b, lse_b)
        if pending is not None:
            kv = pending.wait()
    return out, lse


def ring_backward(dout, q, k, v, out, lse, ctx: ShardContext, causal: bool, scale: float, kernel, window=None, softcap=None):
    """(dq, dk, dv) in q's dtype; `out` (T, H, D) and `lse` (T, H) are the final merged ones."""
    acc = acc_dtype(q.dtype)
    d, r = ctx.group_size, ctx.rank_in_group
    ring = RingExchange(ctx.group_start, d, r)
    steps = ctx.steps(causal, window)
    lifetimes = ctx.lifetimes(causal, q.device, window)
    mods = _modifiers(window, softcap)
    out_q = out.to(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # accumulator of the block now held
    dkv_pending = None
    for t, step in enumerate(steps):
        kv_pending = ring.start(kv, _kv_shape(ctx, steps[t + 1].src, k), TAG_KV) if t + 1 < d else None
        grads = None
        life, useful = lifetimes[t]
        if useful:
            q_rows, k_rows = step.rows(q.device)
            extra = mods if life is None else dict(mods, visible=life)
            grads = kernel.backward(
                _take(dout, q_rows),
                _take(q, q_rows),
                _take(kv[0], k_rows),
                _take(kv[1], k_rows),
                _take(out_q, q_rows),
                _take(lse, q_rows),
                step.seg,
                step.causal,
                scale,
                **extra,
            )
        if dkv_pending is not None:
            dkv = dkv_pending.wait()
        if grads is not None:
            dq_b, dk_b, dv_b = grads
            if q_rows is None:
                dq += dq_b
            else:
                dq.index_add_(0, q_rows, dq_b.to(acc))
            if k_rows is None:
                dkv[0] += dk_b
                dkv[1] += dv_b
            else:
                dkv[0].index_add_(0, k_rows, dk_b.to(acc))
                dkv[1].index_add_(0, k_rows, dv_b.to(acc))
        if d > 1:
            # the gradient travels on with its block; after the last step this hop takes it home
            next_src = steps[t + 1].src if t + 1 < d else r
            dkv_pending = ring.start(dkv, _kv_shape(ctx, next_src, k), TAG_DKV)
        if kv_pending is not None:
            kv = kv_pending.wait()
    if dkv_pending is not None:
        dkv = dkv_pending.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, ctx, causal, scale, kernel, window=None, softcap=None):
        out, lse = ring_forward(q, k, v, ctx, causal, scale, kernel, window, softcap)
        out = out.to(q.dtype)  # kept in the input dtype, as flash attention does, to save activation memory
        fctx.save_for_backward(q, k, v, out, lse)
        fctx.ring = (ctx, causal, scale, kernel, window, softcap)
        return out

    @staticmethod
    def backward(fctx, dout):
        q, k, v, out, lse = fctx.saved_tensors
        ctx, causal, scale, kernel, window, softcap = fctx.ring
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx, causal, scale, kernel, window, softcap)
        return dq, dk, dv, None, None, None, None, None, None


def _validate(q, k, v, ctx: ShardContext, causal: bool = True) -> None:
    if not isinstance(ctx, ShardContext):
        raise ValueError(f"ctx must be a ShardContext (hetsp.attention.make_shard_context), got {type(ctx).__name__}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (tokens, heads, head_dim); got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head_dim differs: q has {q.shape[2]}, k/v have {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    n = ctx.layout.num_tokens
    if q.shape[0] != n or k.shape[0] != n:
        raise ValueError(
            f"this rank holds {n} tokens by its cu_seqlens (ctx.layout), but q has {q.shape[0]} and k {k.shape[0]}; "
            "gather the rank's tokens with ctx.layout.token_index and build the context from the same lengths"
        )
    if ctx.tree is not None and not causal:
        raise ValueError("<bkspc> sequences (ctx.tree) define causal attention over ancestors only; call with causal=True")
    if q.device != k.device or q.device != v.device or q.device != ctx.positions.device:
        raise ValueError(f"q, k, v and the context must be on one device, got {q.device}, {k.device}, {v.device}, {ctx.positions.device}")


_KERNELS_WITH = {"window": ("'reference'", "'torch_cpu'", "'triton'"), "softcap": ("'flash_attn'", "'reference'", "'torch_cpu'", "'triton'")}


def _check_kernel(kernel, window, softcap) -> None:
    """Refuse, before any exchange, a score modifier the block kernel does not implement."""
    wanted = [name for name, value in (("window", window), ("softcap", softcap)) if value is not None]
    missing = [name for name in wanted if name not in kernel.score_modifiers]
    if missing:
        raise NotImplementedError(
            f"attention kernel {kernel.name!r} does not implement {' and '.join(missing)} "
            f"({'sliding window' if missing[0] == 'window' else 'logit softcapping'}); use kernel={', '.join(_KERNELS_WITH[missing[0]])}"
        )


def _check_modifiers(causal: bool, window, softcap) -> tuple[int | None, float | None]:
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"sliding window must be an int >= 1 (keys visible per query, itself included), got {window!r}")
        if not causal:
            raise ValueError("a sliding window is implemented for causal attention only; pass causal=True or window=None")
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0:
            raise ValueError(f"softcap must be > 0 (scores become softcap * tanh(score / softcap)), got {softcap!r}")
    return window, softcap


def ring_attention(q, k, v, ctx: ShardContext, causal: bool = True, softmax_scale: float | None = None, *, window: int | None = None, softcap: float | None = None):
    """Attention of this rank's queries against all keys of their sequences across the group.

    q (T, H, D), k/v (T, K, D) with H a multiple of K; T = ctx.layout.num_tokens, in the
    layout's order. Returns (T, H, D) in q's dtype; differentiable in q, k, v. Every rank
    of the group must call it together (a rank holding 0 tokens too).
    `window`: sliding window, the number of keys a query sees, itself included (query at
    position p sees p-window+1..p; transformers' `sliding_window`). `softcap`: scores become
    softcap * tanh(score / softcap) (Gemma2's attention logit softcapping).
    """
    _validate(q, k, v, ctx, causal)
    window, softcap = _check_modifiers(causal, window, softcap)
    _check_kernel(ctx.kernel, window, softcap)
    if window is not None and ctx.tree is not None:
        raise NotImplementedError("ring attention: a sliding window on <bkspc> sequences is not supported (the window "
                                  "would count positions, not ancestors); train such sequences without the window")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return _RingAttention.apply(q, k, v, ctx, causal, float(scale), ctx.kernel, window, softcap)


def ring_attention_ref(q, k, v, ctx: ShardContext, causal: bool = True, softmax_scale: float | None = None, *, window: int | None = None, softcap: float | None = None):
    """Reference twin of `ring_attention` (same shapes): the same ring with the plain-torch
    block kernel, which computes in float64 for float64 inputs."""
    _validate(q, k, v, ctx, causal)
    window, softcap = _check_modifiers(causal, window, softcap)
    _check_kernel(REFERENCE_KERNEL, window, softcap)
    if window is not None and ctx.tree is not None:
        raise NotImplementedError("ring attention: a sliding window on <bkspc> sequences is not supported (the window "
                                  "would count positions, not ancestors); train such sequences without the window")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return _RingAttention.apply(q, k, v, ctx, causal, float(scale), REFERENCE_KERNEL, window, softcap)
