"""Diagonal S4 (S4D) mixer: zero-order-hold discretisation, S4D-Lin / S4D-Inv initialisation, learned step.

Per channel h and complex mode n (N/2 modes, conjugate pairs): a = -exp(log_a_re) + i a_im,
A_bar = exp(dt a), B_bar = (A_bar - 1) / a (B = 1), y = 2 Re(sum_n C h) + D u.
Block: out_proj(GELU(y)).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels.tree import tree_kw as _tree_kw
from ..layers import zero_pads


class S4DMixer(nn.Module):
    kind = "s4d"

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d, modes = config.hidden_size, config.s4d_state_size // 2
        self.init_kind = config.s4d_init
        self.dt_range = (config.s4d_dt_min, config.s4d_dt_max)
        self.state_size = config.s4d_state_size
        self.log_dt = nn.Parameter(torch.empty(d))
        self.log_a_re = nn.Parameter(torch.empty(d, modes))
        self.a_im = nn.Parameter(torch.empty(d, modes))
        self.c = nn.Parameter(torch.empty(d, modes, 2))  # real and imaginary parts
        self.skip = nn.Parameter(torch.empty(d))
        self.out_proj = nn.Linear(d, d, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        d, modes = self.log_a_re.shape
        lo, hi = self.dt_range
        self.log_dt.uniform_(math.log(lo), math.log(hi))
        self.log_a_re.fill_(math.log(0.5))
        n = torch.arange(modes, dtype=torch.float32, device=self.a_im.device)
        if self.init_kind == "lin":
            im = math.pi * n
        else:  # S4D-Inv
            big_n = self.state_size
            im = (big_n / math.pi) * (big_n / (2 * n + 1) - 1)
        self.a_im.copy_(im.expand(d, modes))
        self.c.normal_(0.0, math.sqrt(0.5))
        self.skip.normal_(0.0, 1.0)

    def discretize(self, dtype: torch.dtype):
        """A_bar, B_bar, C, each (D, N/2) complex in the complex type of `dtype`."""
        dt = torch.exp(self.log_dt.to(dtype))[:, None]
        a = torch.complex(-torch.exp(self.log_a_re.to(dtype)), self.a_im.to(dtype))
        dta = dt * a
        a_bar = torch.exp(dta)
        b_bar = (a_bar - 1) / a
        c = torch.view_as_complex(self.c.to(dtype).contiguous())
        return a_bar, b_bar, c

    def forward(self, hidden_states, *, cache=None, cu_seqlens=None, stack_tree=None, token_mask=None, **kwargs):
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        # Pads (token_mask False) feed nothing into the state (a zero state stays zero through left padding).
        u = zero_pads(hidden_states.to(dtype), token_mask)
        entry = cache.layer(self.layer_idx) if cache is not None else None
        state = entry.get("s4d") if entry is not None else None
        a_bar, b_bar, c = self.discretize(dtype)
        y, final = self.kernels["s4d_scan"](u, a_bar, b_bar, c, cu_seqlens=cu_seqlens, initial_state=state, **_tree_kw(stack_tree))
        if entry is not None:
            entry["s4d"] = final
        y = y + self.skip.to(dtype) * u
        return self.out_proj(F.gelu(y).to(hidden_states.dtype))
