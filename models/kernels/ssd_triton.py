"""Triton kernel for the within-chunk SSD scan (`ssd_intra`), used on CUDA.

One program per (chunk, head): y = (exp(segsum(log_a)) * C B^T) x over the chunk.
The backward runs this same kernel three more times (see `ssd.SSDIntra`), so
forward and backward both execute in Triton. Under TRITON_INTERPRET=1 (set
before triton is imported) it also runs on CPU, which is how the tests check it.

Shapes: x (C, Q, H, P), log_a (C, Q, H), B, C (C, Q, G, N) -> y (C, Q, H, P).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ssd_intra_kernel(
    X, LA, Bp, Cp, Y,
    Q, H, P, G, N, heads_per_group,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    c = tl.program_id(0)
    h = tl.program_id(1)
    g = h // heads_per_group
    iq = tl.arange(0, BLOCK_Q)
    ip = tl.arange(0, BLOCK_P)
    i_n = tl.arange(0, BLOCK_N)
    mq = iq < Q
    la = tl.load(LA + (c * Q + iq) * H + h, mask=mq, other=0.0)
    cs = tl.cumsum(la, 0)
    bc_off = ((c * Q + iq[:, None]) * G + g) * N + i_n[None, :]
    m_bn = mq[:, None] & (i_n[None, :] < N)
    b = tl.load(Bp + bc_off, mask=m_bn, other=0.0)
    cm = tl.load(Cp + bc_off, mask=m_bn, other=0.0)
    if IEEE:
        s = tl.dot(cm, tl.trans(b), input_precision="ieee")
    else:
        s = tl.dot(cm, tl.trans(b))
    causal = iq[:, None] >= iq[None, :]
    diff = tl.where(causal, cs[:, None] - cs[None, :], float("-inf"))
    s = s * tl.exp(diff)
    x_off = ((c * Q + iq[:, None]) * H + h) * P + ip[None, :]
    m_xp = mq[:, None] & (ip[None, :] < P)
    x = tl.load(X + x_off, mask=m_xp, other=0.0)
    if IEEE:
        y = tl.dot(s.to(x.dtype), x, input_precision="ieee")
    else:
        y = tl.dot(s.to(x.dtype), x)
    tl.store(Y + x_off, y.to(Y.dtype.element_ty), mask=m_xp)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# One program holds a whole chunk, so the tiles are fixed by the shapes: BLOCK_Q is the chunk
# size (the block-size option of this kernel is the model's `mamba_chunk_size`, 64 by default
# as in Mamba-2), BLOCK_P and BLOCK_N the head and state dims rounded up to a power of two
# >= 16 (tl.dot's minimum). What remains free is the number of warps per program: Triton's
# default of 4 suits 64 x 64 fp32 tiles (the (Q, Q) score tile is 16 KiB); 8 may pay off for
# chunks of 128, whose score tile is four times larger.
DEFAULT_NUM_WARPS = 4


def ssd_intra_triton(x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     num_warps: int = DEFAULT_NUM_WARPS) -> torch.Tensor:
    """Same contract as `ssd.ssd_intra_torch`; inputs of one float dtype (fp32 on GPU).

    num_warps: warps per program (a power of two from 1 to 16).
    """
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"ssd_intra_triton: num_warps = {num_warps!r}, must be one of 1, 2, 4, 8, 16")
    num_chunks, q, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    x, log_a, B, C = (t.contiguous() for t in (x, log_a.to(x.dtype), B.to(x.dtype), C.to(x.dtype)))
    y = torch.empty_like(x)
    if num_chunks == 0:
        return y
    _ssd_intra_kernel[(num_chunks, H)](
        x, log_a, B, C, y, q, H, P, G, N, H // G,
        BLOCK_Q=_block(q), BLOCK_P=_block(P), BLOCK_N=_block(N), IEEE=x.dtype == torch.float32,
        num_warps=num_warps,
    )
    return y
