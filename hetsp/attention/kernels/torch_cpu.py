"""Block kernel on torch's CPU flash-attention op (returns the log-sum-exp, has a backward).

Legend: T tokens, H query heads, K kv heads, D head dim, B segments of one shape.
The op is dense (layout (B, H, S, D)); runs of equal-shape segments at fixed strides are
batched into one call on a strided view (many short sequences cost few calls). Never
called with an empty segment (a zero-length q or k kills the process). Causal alignment:
top-left (query i sees keys j <= i) when query and key lengths differ; hetsp only calls it
causally with equal lengths. GQA: K/V heads are repeated here, after communication, and
their gradients summed back.

Sliding window: each segment's queries run in tiles against only the key rows their windows
reach, with an additive (0 / -inf) mask from the rows' global positions; a row whose mask
hides every key gets lse = 0 from the op, so such rows are set to lse = -inf, out = 0 (the
ring never sends them: its steps drop rows that see no key of a block).
Logit softcapping changes the score function, which the op cannot do: a softcapped block
is computed by the plain-torch reference kernel (exact, slower), logged once.
"""

from __future__ import annotations

import bisect
import logging
from functools import lru_cache

import torch

from .base import BlockKernel, Lifetimes, Segments, acc_dtype, reduce_kv, repeat_kv, window_visible
from .reference import block_backward_ref, block_forward_ref

logger = logging.getLogger("hetsp.attention")


@lru_cache(maxsize=None)
def _log_softcap_path() -> None:
    logger.info("attention kernel torch_cpu: softcapped blocks run on the plain-torch reference kernel (the CPU flash op has no softcap)")


def _op():
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _op_backward():
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _batches(seg: Segments) -> list[tuple[int, int, int, int, int, int, int]]:
    """Equal-shape segments whose starts advance by fixed steps, as strided batches (cached).

    Each entry (nq, nk, q_start, k_start, q_step, k_step, B): segment i of the batch is
    q rows [q_start + i q_step, + nq) and k rows [k_start + i k_step, + nk), so a batch is a
    strided view of the packed tensors (no gather), e.g. many short sequences in a row.
    """
    key = "torch_cpu_batches"
    if key not in seg.cache:
        open_runs: dict[tuple[int, int], list[int]] = {}
        batches = []
        for a, b, c, e in zip(seg.cu_q, seg.cu_q[1:], seg.cu_k, seg.cu_k[1:]):
            shape = (b - a, e - c)
            run = open_runs.get(shape)  # [q_start, k_start, q_step, k_step, count, last_a, last_c]
            if run is not None and (run[4] == 1 or (a - run[5] == run[2] and c - run[6] == run[3])):
                if run[4] == 1:
                    run[2], run[3] = a - run[5], c - run[6]
                run[4] += 1
                run[5], run[6] = a, c
                continue
            if run is not None:
                batches.append((*shape, *run[:5]))
            open_runs[shape] = [a, c, shape[0], shape[1], 1, a, c]
        batches.extend((*shape, *run[:5]) for shape, run in open_runs.items())
        seg.cache[key] = batches
    return seg.cache[key]


def _view(x_TXD: torch.Tensor, start: int, step: int, n: int, b: int) -> torch.Tensor:
    """Rows [start + i step, start + i step + n) for i < b of a (T, X, D) tensor, as (B, X, n, D)."""
    s0, s1, s2 = x_TXD.stride()
    return x_TXD.as_strided((b, n, x_TXD.shape[1], x_TXD.shape[2]), (step * s0, s0, s1, s2), x_TXD.storage_offset() + start * s0).transpose(1, 2)


def _batch_mask(visible: Lifetimes | None, nq, nk, qa, ka, qs, ks, b, dtype):
    """Additive (B, 1, nq, nk) lifetime mask of one strided batch and (B, nq) 'row sees a key', or (None, None).

    The op takes no boolean mask (only one of q's dtype) and gives a row whose mask hides
    every key lse = 0, not -inf: the caller resets such rows."""
    if visible is None:
        return None, None
    dev = visible.q_time.device
    qi = qa + torch.arange(b, device=dev)[:, None] * qs + torch.arange(nq, device=dev)
    ki = ka + torch.arange(b, device=dev)[:, None] * ks + torch.arange(nk, device=dev)
    qt = visible.q_time[qi][..., None]
    allowed = (visible.k_time[ki][:, None, :] <= qt) & (qt < visible.k_pop[ki][:, None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, float("-inf"))
    return mask[:, None], allowed.any(-1)


def _window_tiles(seg: Segments, window: int) -> list[tuple[int, int, int, int]]:
    """Sub-blocks (q_start, nq, k_start, nk) covering a sliding-window block (cached): each
    segment's queries in tiles of max(window, 128) rows, each with the key rows its windows
    reach (positions ascend within a segment, so that is one contiguous range). A query row
    belongs to one tile, so the op never computes far outside the window."""
    key = ("torch_cpu_window_tiles", window)
    if key not in seg.cache:
        q_pos, k_pos = seg.q_pos, seg.k_pos
        if q_pos is None or k_pos is None:
            raise ValueError("a sliding-window block needs the rows' global positions: set Segments.q_pos and k_pos")
        size = max(window, 128)
        tiles = []
        for a, b, c, e in zip(seg.cu_q, seg.cu_q[1:], seg.cu_k, seg.cu_k[1:]):
            keys = k_pos[c:e]
            for t0 in range(a, b, size):
                t1 = min(b, t0 + size)
                lo = c + bisect.bisect_left(keys, q_pos[t0] - window + 1)
                hi = c + bisect.bisect_right(keys, q_pos[t1 - 1])
                if hi > lo:
                    tiles.append((t0, t1 - t0, lo, hi - lo))
        seg.cache[key] = tiles
    return seg.cache[key]


def _tile_mask(seg: Segments, window: int, dtype, device, qa, nq, ka, nk):
    """(1, 1, nq, nk) additive mask (0 visible, -inf hidden) of one tile, and (nq,) 'sees a key'."""
    q_pos, k_pos = seg.device_pos(device)
    visible = window_visible(q_pos[qa : qa + nq], k_pos[ka : ka + nk], window)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return mask[None, None], visible.any(-1)


def _window_forward(q_THD, k_THD, v_THD, seg: Segments, scale: float, window: int):
    out = torch.zeros_like(q_THD)
    lse = torch.full(q_THD.shape[:2], float("-inf"), dtype=acc_dtype(q_THD.dtype), device=q_THD.device)
    for qa, nq, ka, nk in _window_tiles(seg, window):
        mask, seen = _tile_mask(seg, window, q_THD.dtype, q_THD.device, qa, nq, ka, nk)
        o, l = _op()(_view(q_THD, qa, 0, nq, 1), _view(k_THD, ka, 0, nk, 1), _view(v_THD, ka, 0, nk, 1), 0.0, False, attn_mask=mask, scale=scale)
        if not bool(seen.all()):
            # the op returns lse = 0 for a row whose mask hides every key; such a row has seen nothing
            o = o.masked_fill(~seen[None, None, :, None], 0.0)
            l = l.masked_fill(~seen[None, None, :], float("-inf"))
        _view(out, qa, 0, nq, 1).copy_(o)
        _view(lse[..., None], qa, 0, nq, 1)[..., 0].copy_(l)
    return out, lse


def _window_backward(dout_THD, q_THD, k_THD, v_THD, out_THD, lse_TH1, seg: Segments, scale: float, window: int):
    dq = torch.zeros_like(q_THD)
    dk = torch.zeros(k_THD.shape, dtype=lse_TH1.dtype, device=q_THD.device)  # tiles share keys: accumulate
    dv = torch.zeros_like(dk)
    for qa, nq, ka, nk in _window_tiles(seg, window):
        mask, _ = _tile_mask(seg, window, q_THD.dtype, q_THD.device, qa, nq, ka, nk)
        gq, gk, gv = _op_backward()(
            _view(dout_THD, qa, 0, nq, 1).contiguous(), _view(q_THD, qa, 0, nq, 1), _view(k_THD, ka, 0, nk, 1),
            _view(v_THD, ka, 0, nk, 1), _view(out_THD, qa, 0, nq, 1).contiguous(),
            _view(lse_TH1, qa, 0, nq, 1)[..., 0].contiguous(), 0.0, False, attn_mask=mask, scale=scale,
        )
        _view(dq, qa, 0, nq, 1).copy_(gq)
        _view(dk, ka, 0, nk, 1).add_(gk)
        _view(dv, ka, 0, nk, 1).add_(gv)
    return dq, dk, dv


def block_forward(q_THD, k_TKD, v_TKD, seg: Segments, causal: bool, scale: float, visible: Lifetimes | None = None, *,
                  window=None, softcap=None):
    """(out (Tq, H, D) in q's dtype, lse (Tq, H) in acc dtype); `visible`: optional lifetime mask
    (it implies causality, so the op then runs unmasked-causal with the additive mask)."""
    if visible is not None and window is not None:
        raise NotImplementedError("attention kernel torch_cpu: a sliding window on <bkspc> sequences is not supported; "
                                  "train such models without backspace, or without the window")
    if softcap is not None:
        _log_softcap_path()
        return block_forward_ref(q_THD, k_TKD, v_TKD, seg, causal, scale, visible, window=window, softcap=softcap)
    num_heads = q_THD.shape[1]
    k_THD, v_THD = repeat_kv(k_TKD, num_heads), repeat_kv(v_TKD, num_heads)
    if window is not None:
        return _window_forward(q_THD, k_THD, v_THD, seg, scale, window)
    out = torch.empty_like(q_THD)
    lse = torch.empty(q_THD.shape[:2], dtype=acc_dtype(q_THD.dtype), device=q_THD.device)
    for nq, nk, qa, ka, qs, ks, b in _batches(seg):
        mask = seen = None
        if visible is not None:
            mask, seen = _batch_mask(visible, nq, nk, qa, ka, qs, ks, b, q_THD.dtype)
        o, l = _op()(
            _view(q_THD, qa, qs, nq, b), _view(k_THD, ka, ks, nk, b), _view(v_THD, ka, ks, nk, b), 0.0,
            causal and mask is None, attn_mask=mask, scale=scale,
        )
        if seen is not None and not bool(seen.all()):
            # the op returns lse = 0 for a row whose mask hides every key; such a row has seen nothing
            o = o.masked_fill(~seen[:, None, :, None], 0.0)
            l = l.masked_fill(~seen[:, None, :], float("-inf"))
        _view(out, qa, qs, nq, b).copy_(o)
        _view(lse[..., None], qa, qs, nq, b)[..., 0].copy_(l)
    return out, lse


def block_backward(dout_THD, q_THD, k_TKD, v_TKD, out_THD, lse_TH, seg: Segments, causal: bool, scale: float,
                   visible: Lifetimes | None = None, *, window=None, softcap=None):
    """(dq (Tq, H, D), dk (Tk, K, D), dv) from the given final `out` and `lse`."""
    if visible is not None and window is not None:
        raise NotImplementedError("attention kernel torch_cpu: a sliding window on <bkspc> sequences is not supported; "
                                  "train such models without backspace, or without the window")
    if softcap is not None:
        return block_backward_ref(dout_THD, q_THD, k_TKD, v_TKD, out_THD, lse_TH, seg, causal, scale, visible,
                                  window=window, softcap=softcap)
    num_heads, num_kv = q_THD.shape[1], k_TKD.shape[1]
    k_THD, v_THD = repeat_kv(k_TKD, num_heads), repeat_kv(v_TKD, num_heads)
    lse_dtype = acc_dtype(q_THD.dtype)
    dout_THD = dout_THD.to(q_THD.dtype)
    out_THD = out_THD.to(q_THD.dtype)
    lse_TH1 = lse_TH.to(lse_dtype)[..., None]
    if window is not None:
        dq, dk, dv = _window_backward(dout_THD, q_THD, k_THD, v_THD, out_THD, lse_TH1, seg, scale, window)
        return dq, reduce_kv(dk, num_kv), reduce_kv(dv, num_kv)
    dq = torch.empty_like(q_THD)
    dk = torch.empty_like(k_THD)
    dv = torch.empty_like(v_THD)
    for nq, nk, qa, ka, qs, ks, b in _batches(seg):
        mask = None
        if visible is not None:
            mask, _ = _batch_mask(visible, nq, nk, qa, ka, qs, ks, b, q_THD.dtype)
        gq, gk, gv = _op_backward()(
            _view(dout_THD, qa, qs, nq, b).contiguous(),
            _view(q_THD, qa, qs, nq, b),
            _view(k_THD, ka, ks, nk, b),
            _view(v_THD, ka, ks, nk, b),
            _view(out_THD, qa, qs, nq, b).contiguous(),
            _view(lse_TH1, qa, qs, nq, b)[..., 0].contiguous(),
            0.0,
            causal and mask is None,
            attn_mask=mask,
            scale=scale,
        )
        _view(dq, qa, qs, nq, b).copy_(gq)
        _view(dk, ka, ks, nk, b).copy_(gk)
        _view(dv, ka, ks, nk, b).copy_(gv)
    return dq, reduce_kv(dk.to(lse_dtype), num_kv), reduce_kv(dv.to(lse_dtype), num_kv)


TORCH_CPU_KERNEL = BlockKernel(
    name="torch_cpu",
    forward=block_forward,
    backward=block_backward,
    causal_alignment="top_left",
    note="aten._scaled_dot_product_flash_attention_for_cpu, one call per run of equal segments",
    lifetime_mask=True,
    score_modifiers=frozenset({"window", "softcap"}),
)
