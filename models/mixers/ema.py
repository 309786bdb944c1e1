"""MEGA's multi-dimensional damped EMA, as a module (`DampedEMA`) and as a mixer (`EMAMixer`).

Per channel d and expansion n (N = ema_dim): p = sigmoid(delta), alpha = sigmoid(alpha'),
q = 1 - p alpha; h_t = q h_{t-1} + p beta x_t; y_t = sum_n gamma_n sqrt(1/N) h_t[n] + omega x_t.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels.tree import tree_kw as _tree_kw
from ..layers import zero_pads


class DampedEMA(nn.Module):
    def __init__(self, dim: int, ema_dim: int):
        super().__init__()
        self.dim, self.ema_dim = dim, ema_dim
        self.delta = nn.Parameter(torch.empty(dim, ema_dim))
        self.alpha = nn.Parameter(torch.empty(dim, ema_dim))
        self.beta = nn.Parameter(torch.empty(dim, ema_dim))
        self.gamma = nn.Parameter(torch.empty(dim, ema_dim))
        self.omega = nn.Parameter(torch.empty(dim))
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        nn.init.normal_(self.delta, 0.0, 0.2)
        nn.init.normal_(self.alpha, 0.0, 0.2)
        # MEGA starts beta near alternating +-1 so the N components differ in sign.
        sign = torch.ones(self.ema_dim, device=self.beta.device)
        sign[1::2] = -1
        self.beta.copy_(sign.expand_as(self.beta) + torch.randn_like(self.beta) * 0.02)
        nn.init.normal_(self.gamma, 0.0, 1.0)
        nn.init.normal_(self.omega, 0.0, 1.0)

    def coefficients(self, dtype: torch.dtype):
        """q, p*beta, gamma*sqrt(1/N), each (D, N), in `dtype`."""
        p = torch.sigmoid(self.delta.to(dtype))
        alpha = torch.sigmoid(self.alpha.to(dtype))
        q = 1.0 - p * alpha
        return q, p * self.beta.to(dtype), self.gamma.to(dtype) * math.sqrt(1.0 / self.ema_dim)

    def forward(self, x, kernels, cu_seqlens=None, state=None, tree=None, token_mask=None):
        """x (B, L, D) -> y (B, L, D), final state (S, D, N). token_mask (B, L) bool or None: pads
        (False) feed nothing into the state, so a zero state stays zero through left padding."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        xs = zero_pads(x.to(dtype), token_mask)
        q, pb, gamma = self.coefficients(dtype)
        y, final = kernels["ema_scan"](xs, q, pb, gamma, cu_seqlens=cu_seqlens, initial_state=state, **_tree_kw(tree))
        return (y + self.omega.to(dtype) * xs).to(x.dtype), final


class EMAMixer(nn.Module):
    """y = out_proj(SiLU(EMA(x)))."""

    kind = "ema"

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ema = DampedEMA(config.hidden_size, config.ema_dim)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, *, cache=None, cu_seqlens=None, stack_tree=None, token_mask=None, **kwargs):
        entry = cache.layer(self.layer_idx) if cache is not None else None
        state = entry.get("ema") if entry is not None else None
        y, final = self.ema(hidden_states, self.kernels, cu_seqlens, state, stack_tree, token_mask)
        if entry is not None:
            entry["ema"] = final
        return self.out_proj(F.silu(y))
