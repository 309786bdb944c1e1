"""Block kernel on torch's CPU flash-attention op (returns the log-sum-exp, has a backward).

Legend: T tokens, H query heads, K kv heads, D head dim. Loops over segments (the op is
dense, layout (B, H, S, D)); never called with an empty segment (a zero-length q or k
kills the process). Causal alignment: top-left (query i sees keys j <= i) when query and
key lengths differ; hetsp only calls it causally with equal lengths. GQA: K/V heads are
repeated here, after communication, and their gradients summed back.
"""

from __future__ import annotations

import torch

from .base import BlockKernel, Segments, acc_dtype, reduce_kv, repeat_kv


def _op():
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _op_backward():
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _bhsd(x_TXD: torch.Tensor) -> torch.Tensor:
    return x_TXD.transpose(0, 1).unsqueeze(0)


def block_forward(q_THD, k_TKD, v_TKD, seg: Segments, causal: bool, scale: float):
    """(out (Tq, H, D) in q's dtype, lse (Tq, H) in acc dtype)."""
    num_heads = q_THD.shape[1]
    k_THD, v_THD = repeat_kv(k_TKD, num_heads), repeat_kv(v_TKD, num_heads)
    out = torch.empty_like(q_THD)
    lse = torch.empty(q_THD.shape[:2], dtype=acc_dtype(q_THD.dtype), device=q_THD.device)
    for a, b, c, e in zip(seg.cu_q, seg.cu_q[1:], seg.cu_k, seg.cu_k[1:]):
        o, l = _op()(_bhsd(q_THD[a:b]), _bhsd(k_THD[c:e]), _bhsd(v_THD[c:e]), 0.0, causal, scale=scale)
        out[a:b] = o[0].transpose(0, 1)
        lse[a:b] = l[0].transpose(0, 1)
    return out, lse


def block_backward(dout_THD, q_THD, k_TKD, v_TKD, out_THD, lse_TH, seg: Segments, causal: bool, scale: float):
    """(dq (Tq, H, D), dk (Tk, K, D), dv) from the given final `out` and `lse`."""
    num_heads, num_kv = q_THD.shape[1], k_TKD.shape[1]
    k_THD, v_THD = repeat_kv(k_TKD, num_heads), repeat_kv(v_TKD, num_heads)
    lse_dtype = acc_dtype(q_THD.dtype)
    out_THD = out_THD.to(q_THD.dtype)
    dq = torch.empty_like(q_THD)
    dk = torch.empty_like(k_THD)
    dv = torch.empty_like(v_THD)
    for a, b, c, e in zip(seg.cu_q, seg.cu_q[1:], seg.cu_k, seg.cu_k[1:]):
        lse = lse_TH[a:b].to(lse_dtype).transpose(0, 1).unsqueeze(0).contiguous()
        gq, gk, gv = _op_backward()(
            _bhsd(dout_THD[a:b]).contiguous(),
            _bhsd(q_THD[a:b]),
            _bhsd(k_THD[c:e]),
            _bhsd(v_THD[c:e]),
            _bhsd(out_THD[a:b]).contiguous(),
            lse,
            0.0,
            causal,
            scale=scale,
        )
        dq[a:b] = gq[0].transpose(0, 1)
        dk[c:e] = gk[0].transpose(0, 1)
        dv[c:e] = gv[0].transpose(0, 1)
    return dq, reduce_kv(dk.to(lse_dtype), num_kv), reduce_kv(dv.to(lse_dtype), num_kv)


TORCH_CPU_KERNEL = BlockKernel(
    name="torch_cpu",
    forward=block_forward,
    backward=block_backward,
    causal_alignment="top_left",
    note="aten._scaled_dot_product_flash_attention_for_cpu, one call per segment",
)
