"""Block kernel on torch's own CUDA flash-attention ops (the flash backend of SDPA), varlen.

Legend: T tokens, H query heads, K kv heads (the op handles GQA natively), D head dim.
`aten._flash_attention_forward` with cumulative lengths is flash-attention 2's varlen
forward as built into torch: it returns the log-sum-exp, and its backward takes the
caller's `out` and `lse`, so the ring's final merged ones can be given (nothing is
recomputed block-locally). Causal alignment: bottom-right (flash-attention >= 2.1).
fp16/bf16 only, CUDA only, head dim up to 256. Not exercised on a CPU-only machine:
`bench/gpu_check.sh` checks it against the fp64 reference and times it against the Triton
kernel; `attention.kernel = "auto"` never picks it (select it by name once the check has
recorded it exact and faster on your GPU).
"""

from __future__ import annotations

import torch

from .base import BlockKernel, Segments


def _check(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the torch_flash kernel takes fp16 or bf16 inputs, got {q.dtype}; use kernel='triton' for fp32")
    if q.device.type != "cuda":
        raise ValueError(f"the torch_flash kernel needs CUDA tensors, got {q.device}; use kernel='auto'")


def _lse_TH(lse: torch.Tensor, num_tokens: int, num_heads: int) -> torch.Tensor:
    if lse.shape != (num_heads, num_tokens):
        raise ValueError(f"torch's flash op returned a log-sum-exp of shape {tuple(lse.shape)}, expected unpadded "
                         f"({num_heads}, {num_tokens}); this torch build cannot serve as a block kernel, use kernel='triton'")
    return lse.transpose(0, 1).float()


def block_forward(q_THD, k_TKD, v_TKD, seg: Segments, causal: bool, scale: float):
    """(out (Tq, H, D) in q's dtype, lse (Tq, H) fp32)."""
    _check(q_THD)
    cu_q, cu_k = seg.device_cu(q_THD.device)
    out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
        q_THD.contiguous(), k_TKD.contiguous(), v_TKD.contiguous(), cu_q, cu_k, seg.max_q, seg.max_k,
        0.0, bool(causal), False, scale=float(scale),
    )
    return out, _lse_TH(lse, q_THD.shape[0], q_THD.shape[1])


def block_backward(dout_THD, q_THD, k_TKD, v_TKD, out_THD, lse_TH, seg: Segments, causal: bool, scale: float):
    """(dq (Tq, H, D), dk (Tk, K, D), dv) in q's dtype, from the given final `out` and `lse`."""
    _check(q_THD)
    cu_q, cu_k = seg.device_cu(q_THD.device)
    q = q_THD.contiguous()
    no_dropout_rng = torch.zeros(2, dtype=torch.int64, device=q.device)  # read only with dropout
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout_THD.to(q.dtype).contiguous(), q, k_TKD.contiguous(), v_TKD.contiguous(), out_THD.to(q.dtype).contiguous(),
        lse_TH.float().transpose(0, 1).contiguous(), cu_q, cu_k, seg.max_q, seg.max_k, 0.0, bool(causal),
        no_dropout_rng, torch.empty(0, device=q.device), scale=float(scale),
    )
    return dq, dk, dv


TORCH_FLASH_KERNEL = BlockKernel(
    name="torch_flash",
    forward=block_forward,
    backward=block_backward,
    causal_alignment="bottom_right",
    note="aten._flash_attention_forward/backward (SDPA's flash backend), varlen",
)
