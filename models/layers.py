"""Small building blocks shared by the mixers: RMSNorm, gated RMSNorm, SwiGLU MLP, rotary embedding, pad zeroing."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.promote_types(dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class GatedRMSNorm(RMSNorm):
    """Mamba-2's output norm: RMSNorm(y * SiLU(z))."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x * F.silu(gate))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary_cos_sin(position_ids: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, L, dim) for integer positions (B, L) (half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., L, dim) with cos/sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


def zero_pads(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, ...) with every pad position (token_mask (B, L) False) set to 0; x itself when token_mask is None.

    A select, not a product, so whatever a pad position holds (even inf or nan) cannot reach a real one."""
    if token_mask is None:
        return x
    keep = token_mask.reshape(*token_mask.shape, *([1] * (x.ndim - 2)))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def zero3_partitioned(module, recurse: bool = False) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned `module`'s own parameters (with `recurse`, its
    submodules' too). Built inside `deepspeed.zero.Init`, a rank holds a slice or nothing, so
    shape-dependent initialisation cannot run; hetsp builds models that way only to load a
    checkpoint over every value."""
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=recurse))

