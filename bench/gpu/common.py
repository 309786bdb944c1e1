"""Shared pieces of the GPU check steps: inputs, the chunked fp64 reference, the closeness
measure, timing, and the step recorder that writes partial results as it goes.

Legend: T tokens, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from hetsp.attention.kernels.base import Segments
from hetsp.attention.kernels.reference import block_backward_ref, block_forward_ref

# Tolerances |a - b| <= atol + rtol |b| against fp64, with atol scaled by the reference's RMS
# (outputs of long rows shrink like 1 / sqrt(length), so a fixed atol would either hide errors
# at 64K or fail at length 1). bf16: inputs and P are rounded to 8-bit mantissas (2^-8 = 3.9e-3)
# before tensor-core dots, so a few of those roundings add up: 2e-2. fp32 (IEEE dots, fp32
# accumulation over up to 64K keys, error ~ sqrt(n) eps): 1e-4.
TOLERANCES = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def packed_inputs(lengths, heads, kv_heads, dim, dtype, device, seed):
    """q (T, H, D), k, v (T, K, D), dout (T, H, D) drawn on the CPU from `seed`, cast to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    shapes = ((n, heads, dim), (n, kv_heads, dim), (n, kv_heads, dim), (n, heads, dim))
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def segments_of(lengths) -> Segments:
    cu = [0]
    for s in lengths:
        cu.append(cu[-1] + s)
    return Segments(tuple(cu), tuple(cu))


def reference_fp64(q, k, v, dout, lengths, causal: bool, scale: float, rows_per_chunk: int = 1024):
    """fp64 (out, lse, dq, dk, dv) of packed self-attention, by the reference twin on chunks of
    query rows (a 64K sequence's full score matrix would not fit): rows [a, b) of a causal
    segment see keys [0, b), which bottom-right alignment of a (b-a) x b block gives exactly."""
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float64, device=q.device)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    start = 0
    for n in lengths:
        for a in range(0, n, rows_per_chunk):
            b = min(n, a + rows_per_chunk)
            kend = b if causal else n
            seg = Segments((0, b - a), (0, kend))
            rows, keys = slice(start + a, start + b), slice(start, start + kend)
            o, l = block_forward_ref(q[rows], k[keys], v[keys], seg, causal, scale)
            out[rows], lse[rows] = o, l
            gq, gk, gv = block_backward_ref(dout[rows], q[rows], k[keys], v[keys], o, l, seg, causal, scale)
            dq[rows] = gq
            dk[keys] += gk
            dv[keys] += gv
        start += n
    return out, lse, dq, dk, dv


def closeness(got: torch.Tensor, want: torch.Tensor, rtol: float) -> float:
    """max over elements of |got - want| / (atol + rtol |want|), atol = rtol * RMS(want); <= 1 passes.

    `hetsp.testing.tolerance_ratio`'s measure, computed where the tensors are (it copies to
    the CPU, too slow for the 64K-token tensors of the check's time boxes); NaN counts as inf.
    """
    got, want = got.double(), want.double()
    atol = rtol * want.pow(2).mean().sqrt().clamp_min(1e-30)
    ratio = (got - want).abs() / (atol + rtol * want.abs())
    return torch.nan_to_num(ratio, nan=float("inf")).max().item()


def cuda_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` on the current CUDA stream (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_flops(lengths, heads: int, dim: int, causal: bool) -> tuple[float, float]:
    """Useful (forward, backward) FLOPs: forward 4 s^2 H D per sequence (QK^T and PV), backward
    2.5 x forward (five matmuls, one of them the recomputed QK^T, counted as flash-attention's
    benchmarks count them: 2.5x); a causal mask halves both."""
    fwd = sum(4.0 * s * s * heads * dim for s in lengths) * (0.5 if causal else 1.0)
    return fwd, 2.5 * fwd


def ssd_flops(length: int, heads: int, head_dim: int, groups: int, state: int, chunk: int) -> tuple[float, float]:
    """Useful (forward, backward) FLOPs of the chunked SSD scan: per chunk C B^T (2 L Q N per
    group), its product with x (2 L Q P per head), chunk states and their read-out (2 L P N each,
    per head); the backward counted as twice the forward."""
    fwd = 2.0 * length * chunk * state * groups + heads * (2.0 * length * chunk * head_dim + 4.0 * length * head_dim * state)
    return fwd, 2.0 * fwd
