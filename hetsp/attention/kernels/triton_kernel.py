"""Block kernel in Triton: variable-length flash attention forward and backward with log-sum-exp.

Legend: T tokens, H query heads, K kv heads (G = H / K query heads share one), D head dim.
Causal alignment: bottom-right (query i of a segment with nq queries and nk keys sees keys
j <= i + nk - nq), like flash-attn. fp16, bf16 and fp32 inputs (fp32 dots in IEEE precision);
softmax statistics, lse and dq/dk/dv are fp32. Runs on CUDA, and on CPU tensors under
TRITON_INTERPRET=1 (set before triton is imported), which is how the tests check it here.

Kernels: `_fwd` (one program per query tile, segment, head), `_bwd_dkdv` (one per key tile,
segment, kv head; loops over the G query heads of the kv head, so no atomics) and `_bwd_dq`.
D_i = rowsum(dO_i * O_i) uses the final merged O given by the caller.
Score modifiers (kernels/base.py): logit softcapping (tanh from exp; dS times 1 - tanh^2)
and a sliding window masked by the rows' global positions (index-aligned causal tiling off).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .base import BlockKernel, Lifetimes, Segments


# Tile sizes (BLOCK_M query rows x BLOCK_N key rows per program). On CUDA 64 x 64: with head
# dim up to 128 the q, k, v and accumulator tiles of one program in bf16/fp32 fit the register
# file of one SM with 4 warps (the Triton fused-attention tutorial starts its sweep from such
# tiles), and a 64-row tile keeps a 4K-token sequence at 64 programs per head, enough to fill
# the SMs at a few heads; larger tiles (128) favour long sequences and small head dims.
# tl.dot needs every dot dimension >= 16, and tl.arange a power of two: these are the limits.
# The interpreter runs on CPU, where small tiles keep the tests quick.
DEFAULT_BLOCKS_CUDA = (64, 64)
DEFAULT_BLOCKS_INTERPRETER = (16, 16)


def check_blocks(block_m: int, block_n: int) -> None:
    """ValueError unless both tile sizes are powers of two of at least 16 (Triton's tl.dot limits)."""
    from hetsp.checks import triton_block_ok

    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if not triton_block_ok(b):
            raise ValueError(f"triton attention {name} = {b!r}: must be a power of two >= 16 (tl.dot and tl.arange limits), e.g. 64 or 128")


def _blocks(device: torch.device, blocks: tuple[int, int] | None = None) -> tuple[int, int]:
    if blocks is not None:
        return blocks
    return DEFAULT_BLOCKS_CUDA if device.type == "cuda" else DEFAULT_BLOCKS_INTERPRETER


def _num_warps(block_m: int) -> int:
    # Each program keeps a (BLOCK_M, D) fp32 accumulator and the q tile in registers: with
    # 128-row tiles 4 warps (Triton's default) would need about twice the registers per
    # thread and spill, so they get 8 warps.
    return 8 if block_m >= 128 else 4


@triton.jit
def _alive(QT, KT, KPOP, rows, cols, row_ok, col_ok):
    """Lifetime mask (base.Lifetimes): key j visible to query i iff k_time[j] <= q_time[i] < k_pop[j]."""
    qt = tl.load(QT + rows, mask=row_ok, other=0)
    kt = tl.load(KT + cols, mask=col_ok, other=0)
    kp = tl.load(KPOP + cols, mask=col_ok, other=0)
    return (kt[None, :] <= qt[:, None]) & (qt[:, None] < kp[None, :])


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exp overflowing to inf gives 1, underflowing to 0 gives -1
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _in_window(QP, KP, q0, k0, rows, cols, row_ok, col_ok, window):
    """(BLOCK_M, BLOCK_N) bool: 0 <= q_pos - k_pos < window (kernels/base.py)."""
    qp = tl.load(QP + q0 + rows, mask=row_ok, other=0)
    kp = tl.load(KP + k0 + cols, mask=col_ok, other=0)
    diff = qp[:, None] - kp[None, :]
    return (diff >= 0) & (diff < window)


@triton.jit
def _fwd(Q, K, V, O, L, cu_q, cu_k, QP, KP, scale, window, softcap, s_qt, s_qh, s_kt, s_kh, s_ot, s_oh, s_lt,
         G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
         QT=None, KT=None, KPOP=None, LIFE: tl.constexpr = False):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2)
    kh = h // G
    q0 = tl.load(cu_q + seg)
    nq = tl.load(cu_q + seg + 1) - q0
    k0 = tl.load(cu_k + seg)
    nk = tl.load(cu_k + seg + 1) - k0
    if pid_m * BLOCK_M < nq:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < nq
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + (q0 + offs_m)[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        shift = nk - nq
        end_n = nk
        if CAUSAL:
            end_n = tl.minimum(nk, tl.maximum(0, (pid_m + 1) * BLOCK_M + shift))
        for start_n in range(0, end_n, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < nk
            kt = tl.load(K + (k0 + cols)[None, :] * s_kt + kh * s_kh + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(V + (k0 + cols)[:, None] * s_kt + kh * s_kh + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=PREC) * scale
            if SOFTCAP:
                s = _tanh(s / softcap) * softcap
            valid = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + shift)
            if LIFE:
                valid = valid & _alive(QT, KT, KPOP, q0 + offs_m, k0 + cols, row_ok, col_ok)
            if WINDOW:
                valid = valid & _in_window(QP, KP, q0, k0, offs_m, cols, row_ok, col_ok, window)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(O + (q0 + offs_m)[:, None] * s_ot + h * s_oh + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(L + (q0 + offs_m) * s_lt + h, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, L, DELTA, DK, DV, cu_q, cu_k, QP, KP, scale, window, softcap, s_qt, s_qh, s_kt, s_kh, s_lt, s_gt, s_gh,
              G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
              QT=None, KT=None, KPOP=None, LIFE: tl.constexpr = False):
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    kh = tl.program_id(2)
    q0 = tl.load(cu_q + seg)
    nq = tl.load(cu_q + seg + 1) - q0
    k0 = tl.load(cu_k + seg)
    nk = tl.load(cu_k + seg + 1) - k0
    if pid_n * BLOCK_N < nk:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < nk
        d_ok = offs_d < HEAD_DIM
        k = tl.load(K + (k0 + offs_n)[:, None] * s_kt + kh * s_kh + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + (k0 + offs_n)[:, None] * s_kt + kh * s_kh + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        shift = nk - nq
        start_m = 0
        if CAUSAL:
            start_m = tl.maximum(0, pid_n * BLOCK_N - shift) // BLOCK_M * BLOCK_M
        for g in range(G):
            h = kh * G + g
            for m in range(start_m, nq, BLOCK_M):
                offs_m = m + offs_m0
                row_ok = offs_m < nq
                q = tl.load(Q + (q0 + offs_m)[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                do = tl.load(DO + (q0 + offs_m)[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                lse = tl.load(L + (q0 + offs_m) * s_lt + h, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + (q0 + offs_m) * s_lt + h, mask=row_ok, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
                if SOFTCAP:
                    t = _tanh(s / softcap)
                    s = t * softcap
                valid = row_ok[:, None] & col_ok[None, :]
                if CAUSAL:
                    valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
                if LIFE:
                    valid = valid & _alive(QT, KT, KPOP, q0 + offs_m, k0 + offs_n, row_ok, col_ok)
                if WINDOW:
                    valid = valid & _in_window(QP, KP, q0, k0, offs_m, offs_n, row_ok, col_ok, window)
                p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                if SOFTCAP:
                    ds = ds * (1.0 - t * t)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        mask = col_ok[:, None] & d_ok[None, :]
        tl.store(DK + (k0 + offs_n)[:, None] * s_gt + kh * s_gh + offs_d[None, :], dk * scale, mask=mask)
        tl.store(DV + (k0 + offs_n)[:, None] * s_gt + kh * s_gh + offs_d[None, :], dv, mask=mask)


@triton.jit
def _bwd_dq(Q, K, V, DO, L, DELTA, DQ, cu_q, cu_k, QP, KP, scale, window, softcap, s_qt, s_qh, s_kt, s_kh, s_lt, s_gt, s_gh,
            G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
            QT=None, KT=None, KPOP=None, LIFE: tl.constexpr = False):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2)
    kh = h // G
    q0 = tl.load(cu_q + seg)
    nq = tl.load(cu_q + seg + 1) - q0
    k0 = tl.load(cu_k + seg)
    nk = tl.load(cu_k + seg + 1) - k0
    if pid_m * BLOCK_M < nq:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < nq
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + (q0 + offs_m)[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + (q0 + offs_m)[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(L + (q0 + offs_m) * s_lt + h, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + (q0 + offs_m) * s_lt + h, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        shift = nk - nq
        end_n = nk
        if CAUSAL:
            end_n = tl.minimum(nk, tl.maximum(0, (pid_m + 1) * BLOCK_M + shift))
        for start_n in range(0, end_n, BLOCK_N):
            offs_n = start_n + offs_n0
            col_ok = offs_n < nk
            k = tl.load(K + (k0 + offs_n)[:, None] * s_kt + kh * s_kh + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(V + (k0 + offs_n)[:, None] * s_kt + kh * s_kh + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            if SOFTCAP:
                t = _tanh(s / softcap)
                s = t * softcap
            valid = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
            if LIFE:
                valid = valid & _alive(QT, KT, KPOP, q0 + offs_m, k0 + offs_n, row_ok, col_ok)
            if WINDOW:
                valid = valid & _in_window(QP, KP, q0, k0, offs_m, offs_n, row_ok, col_ok, window)
            p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        tl.store(DQ + (q0 + offs_m)[:, None] * s_gt + h * s_gh + offs_d[None, :], dq * scale, mask=row_ok[:, None] & d_ok[None, :])


_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: torch.Tensor) -> None:
    if q.dtype not in _SUPPORTED:
        raise ValueError(f"the triton attention kernel takes fp16, bf16 or fp32, got {q.dtype}; use kernel='reference' for fp64")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton attention kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")


def _meta(q: torch.Tensor, k: torch.Tensor, causal: bool, window=None, softcap=None,
          blocks: tuple[int, int] | None = None) -> dict:
    bm, bn = _blocks(q.device, blocks)
    return dict(
        WINDOW=window is not None,
        SOFTCAP=softcap is not None,
        G=q.shape[1] // k.shape[1],
        HEAD_DIM=q.shape[2],
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[2])),
        BLOCK_M=bm,
        BLOCK_N=bn,
        CAUSAL=bool(causal) and window is None,  # a window masks by position instead (kernels/base.py)
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=_num_warps(bm),
    )


def _life(visible: Lifetimes | None, device) -> dict:
    if visible is None:
        return {}
    return dict(QT=visible.q_time.to(device).contiguous(), KT=visible.k_time.to(device).contiguous(),
                KPOP=visible.k_pop.to(device).contiguous(), LIFE=True)


def _modifier_args(seg: Segments, device, window, softcap) -> tuple:
    """(QP, KP, window, softcap) kernel arguments; placeholders when a modifier is off."""
    if window is not None:
        q_pos, k_pos = seg.device_pos(device)
    else:
        q_pos = k_pos = seg.device_cu(device)[0]  # never read (WINDOW is off)
    return q_pos, k_pos, int(window or 0), float(softcap or 1.0)


def block_forward(q_THD, k_TKD, v_TKD, seg: Segments, causal: bool, scale: float, visible: Lifetimes | None = None, *,
                  window=None, softcap=None, blocks: tuple[int, int] | None = None):
    """(out (Tq, H, D) in q's dtype, lse (Tq, H) fp32); `visible`: optional lifetime mask (base.Lifetimes);
    blocks: (BLOCK_M, BLOCK_N), None for the default."""
    _check(q_THD)
    q, k, v = q_THD.contiguous(), k_TKD.contiguous(), v_TKD.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    cu_q, cu_k = seg.device_cu(q.device)
    meta = _meta(q, k, causal, window, softcap, blocks)
    mods = _modifier_args(seg, q.device, window, softcap)
    grid = (triton.cdiv(seg.max_q, meta["BLOCK_M"]), seg.num_segments, q.shape[1])
    _fwd[grid](q, k, v, out, lse, cu_q, cu_k, mods[0], mods[1], float(scale), mods[2], mods[3], q.stride(0), q.stride(1), k.stride(0), k.stride(1),
               out.stride(0), out.stride(1), lse.stride(0), **meta, **_life(visible, q.device))
    return out, lse


def block_backward(dout_THD, q_THD, k_TKD, v_TKD, out_THD, lse_TH, seg: Segments, causal: bool, scale: float,
                   visible: Lifetimes | None = None, *, window=None, softcap=None, blocks: tuple[int, int] | None = None):
    """(dq (Tq, H, D), dk (Tk, K, D), dv) in fp32 from the given final `out` and `lse`."""
    _check(q_THD)
    q, k, v = q_THD.contiguous(), k_TKD.contiguous(), v_TKD.contiguous()
    do = dout_THD.to(q.dtype).contiguous()
    lse = lse_TH.float().contiguous()
    delta = (dout_THD.float() * out_THD.float()).sum(-1).contiguous()  # D_i = rowsum(dO * O), final O
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    cu_q, cu_k = seg.device_cu(q.device)
    meta = _meta(q, k, causal, window, softcap, blocks)
    mods = _modifier_args(seg, q.device, window, softcap)
    grid_kv = (triton.cdiv(seg.max_k, meta["BLOCK_N"]), seg.num_segments, k.shape[1])
    _bwd_dkdv[grid_kv](q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, mods[0], mods[1], float(scale), mods[2], mods[3], q.stride(0), q.stride(1),
                       k.stride(0), k.stride(1), lse.stride(0), dk.stride(0), dk.stride(1), **meta, **_life(visible, q.device))
    grid_q = (triton.cdiv(seg.max_q, meta["BLOCK_M"]), seg.num_segments, q.shape[1])
    _bwd_dq[grid_q](q, k, v, do, lse, delta, dq, cu_q, cu_k, mods[0], mods[1], float(scale), mods[2], mods[3], q.stride(0), q.stride(1),
                    k.stride(0), k.stride(1), lse.stride(0), dq.stride(0), dq.stride(1), **meta, **_life(visible, q.device))
    return dq, dk, dv


TRITON_KERNEL = BlockKernel(
    name="triton",
    forward=block_forward,
    backward=block_backward,
    causal_alignment="bottom_right",
    note="Triton varlen flash attention with log-sum-exp",
    lifetime_mask=True,
    score_modifiers=frozenset({"window", "softcap"}),
)


def triton_kernel(block_m: int | None = None, block_n: int | None = None) -> BlockKernel:
    """The Triton block kernel with tiles (block_m, block_n); both None gives `TRITON_KERNEL`."""
    if block_m is None and block_n is None:
        return TRITON_KERNEL
    if block_m is None or block_n is None:
        raise ValueError("give both triton block sizes (block_m and block_n) or neither")
    check_blocks(block_m, block_n)
    blocks = (block_m, block_n)
    return BlockKernel(
        name="triton",
        forward=functools.partial(block_forward, blocks=blocks),
        backward=functools.partial(block_backward, blocks=blocks),
        causal_alignment="bottom_right",
        note=f"Triton varlen flash attention with log-sum-exp, tiles {block_m}x{block_n}",
        lifetime_mask=True,
        score_modifiers=frozenset({"window", "softcap"}),
    )
