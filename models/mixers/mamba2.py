"""Mamba-2 block: in-projection, causal depthwise conv on (x, B, C), SiLU, SSD scan, gated RMSNorm, out-projection.

Legend: D model width, E = expand * D inner width, H = E / P heads of width P,
G groups of B/C with state size N, K conv width.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels.tree import tree_kw as _tree_kw

from ..kernels.conv import conv_tail
from ..layers import GatedRMSNorm, zero_pads


class Mamba2Mixer(nn.Module):
    kind = "mamba2"

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d = config.hidden_size
        self.inner = config.mamba_expand * d
        self.head_dim = config.mamba_head_dim
        self.num_heads = self.inner // self.head_dim
        self.num_groups = config.mamba_n_groups
        self.state_size = config.mamba_d_state
        self.conv_kernel = config.mamba_conv_kernel
        self.chunk_size = config.mamba_chunk_size
        self.conv_dim = self.inner + 2 * self.num_groups * self.state_size
        self.in_proj = nn.Linear(d, self.inner + self.conv_dim + self.num_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.inner, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.inner, d, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.conv_kernel)
        self.conv_weight.uniform_(-bound, bound)
        self.conv_bias.uniform_(-bound, bound)
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1, 16)))
        self.D.fill_(1.0)

    def forward(self, hidden_states, *, cache=None, cu_seqlens=None, stack_tree=None, token_mask=None, **kwargs):
        """token_mask (B, L) bool or None: pads (False) enter the convolution window as zeros and leave
        the SSD state untouched (dt = 0: no decay, no input; x, B, C = 0 there despite the conv bias)."""
        batch, length, _ = hidden_states.shape
        entry = cache.layer(self.layer_idx) if cache is not None else None
        z, xbc, dt = torch.split(self.in_proj(hidden_states), [self.inner, self.conv_dim, self.num_heads], -1)
        xbc = zero_pads(xbc, token_mask)
        halo = entry.get("conv") if entry is not None else None
        conv_out = self.kernels["causal_conv1d"](xbc, self.conv_weight, self.conv_bias, cu_seqlens=cu_seqlens, halo=halo, **_tree_kw(stack_tree))
        if entry is not None:
            entry["conv"] = conv_tail(xbc, cu_seqlens, halo, self.conv_kernel)
        xbc = zero_pads(F.silu(conv_out), token_mask)
        gn = self.num_groups * self.state_size
        x, B, C = torch.split(xbc, [self.inner, gn, gn], -1)
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        x = x.reshape(batch, length, self.num_heads, self.head_dim).to(dtype)
        B = B.reshape(batch, length, self.num_groups, self.state_size).to(dtype)
        C = C.reshape(batch, length, self.num_groups, self.state_size).to(dtype)
        dt = zero_pads(F.softplus(dt.to(dtype) + self.dt_bias.to(dtype)), token_mask)
        A = -torch.exp(self.A_log.to(dtype))
        state = entry.get("ssm") if entry is not None else None
        y, final = self.kernels["ssd_scan"](
            x, dt, A, B, C, self.chunk_size, cu_seqlens=cu_seqlens, initial_states=state, **_tree_kw(stack_tree)
        )
        if entry is not None:
            entry["ssm"] = final
        y = y + self.D.to(dtype)[:, None] * x
        y = y.reshape(batch, length, self.inner).to(hidden_states.dtype)
        return self.out_proj(self.norm(y, z))
