"""Block kernel on flash-attn's variable-length CUDA kernels (imported only when installed).

Legend: T tokens, H query heads, K kv heads (flash-attn handles GQA natively), D head dim.
Causal alignment: bottom-right. lse comes back as (H, T) (flash-attn >= 2.4) and is
returned here as (T, H) fp32. The backward calls flash-attn's varlen backward with the
final merged out and lse; its private signature differs between releases, so the
keyword arguments it accepts are matched by name. Not exercised on this CPU-only
machine: GPU tests (tests/test_attention_kernels.py, marker gpu) cover it.

Logit softcapping is passed to flash-attn (`softcap`). A sliding window is refused: flash-attn's
`window_size` is aligned by row index, and a zigzag block's rows are not contiguous in
position (a rank holds two chunks), so it cannot express the window; use kernel='triton'.
"""

from __future__ import annotations

import inspect

import torch

from .base import BlockKernel, Segments


def _interface():
    from flash_attn import flash_attn_interface

    return flash_attn_interface


def _refuse_window(window) -> None:
    if window is not None:
        raise NotImplementedError(
            "attention kernel 'flash_attn' cannot express hetsp's sliding window (flash-attn aligns windows by row "
            "index, zigzag blocks are not contiguous in position); use kernel='triton' for sliding-window models"
        )


def block_forward(q_THD, k_TKD, v_TKD, seg: Segments, causal: bool, scale: float, *, window=None, softcap=None):
    """(out (Tq, H, D) in q's dtype, lse (Tq, H) fp32)."""
    _refuse_window(window)
    if q_THD.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash-attn takes fp16 or bf16 inputs, got {q_THD.dtype}; cast the model or use kernel='triton'")
    fa = _interface()
    cu_q, cu_k = seg.device_cu(q_THD.device)
    out, lse, _ = fa.flash_attn_varlen_func(
        q_THD.contiguous(), k_TKD.contiguous(), v_TKD.contiguous(), cu_q, cu_k, seg.max_q, seg.max_k,
        dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True,
        **({} if softcap is None else {"softcap": float(softcap)}),
    )
    if lse.dim() != 2:
        raise ValueError(f"flash-attn returned a padded log-sum-exp of shape {tuple(lse.shape)}; hetsp needs flash-attn >= 2.4 (unpadded (H, T) lse)")
    return out, lse.transpose(0, 1).float()


def block_backward(dout_THD, q_THD, k_TKD, v_TKD, out_THD, lse_TH, seg: Segments, causal: bool, scale: float, *, window=None, softcap=None):
    """(dq (Tq, H, D), dk (Tk, K, D), dv) in q's dtype, from the given final `out` and `lse`."""
    _refuse_window(window)
    fa = _interface()
    cu_q, cu_k = seg.device_cu(q_THD.device)
    q, k, v = q_THD.contiguous(), k_TKD.contiguous(), v_TKD.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = dict(
        dout=dout_THD.to(q.dtype).contiguous(), q=q, k=k, v=v, out=out_THD.to(q.dtype).contiguous(),
        softmax_lse=lse_TH.float().transpose(0, 1).contiguous(), dq=dq, dk=dk, dv=dv,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=seg.max_q, max_seqlen_k=seg.max_k,
        dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=(-1, -1), window_size_left=-1,
        window_size_right=-1, softcap=0.0 if softcap is None else float(softcap), alibi_slopes=None, deterministic=False, rng_state=None,
    )
    backward = fa._flash_attn_varlen_backward
    accepted = inspect.signature(backward).parameters
    if softcap is not None and "softcap" not in accepted:
        raise NotImplementedError("this flash-attn release has no softcap in its varlen backward; install flash-attn >= 2.6 or use kernel='triton'")
    backward(**{name: value for name, value in args.items() if name in accepted})
    return dq, dk, dv


FLASH_ATTN_KERNEL = BlockKernel(
    name="flash_attn",
    forward=block_forward,
    backward=block_backward,
    causal_alignment="bottom_right",
    note="flash_attn_varlen_func and its varlen backward",
    score_modifiers=frozenset({"softcap"}),
)
