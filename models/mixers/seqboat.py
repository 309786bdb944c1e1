"""SeqBoat layer (Sparse Modular Activation, Ren et al. 2023), causal LM form.

1. x_hat = RMSNorm(x); m = SiLU(EMA(x_hat)).
2. [u (2), hx (D)] = Linear(m).
3. pi = softmax(u / tau), tau = exp(theta) learned; a token is activated when pi[1] > pi[0];
   its GAU output is scaled by pi[1] (the winning probability), which is how the router learns.
4. Activated tokens are packed to the front of each row, keeping their original positions (rotary).
5. Single-head GAU on the packed tokens: Z, R, V = split(SiLU(W m + b)); Q = Z g0 + b0; K = Z g1 + b1;
   each query attends to the last W activated tokens of its document (itself included); O = W_h((A V) * R).
6. Unpack: tokens not activated get 0.
7. out = SiLU(hx + w * h + x)  (w a learned per-channel weight; the layer owns its residual).

Legend: B rows, L tokens, M packed activated tokens per row, D width, Z query/key width, E value width.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels.segments import segment_ids
from ..layers import RMSNorm, apply_rotary, rotary_cos_sin, zero3_partitioned
from .ema import DampedEMA


def _keep_last_valid(seg: torch.Tensor, window: int, *tensors: torch.Tensor):
    """Per row, the last `window` slots with seg >= 0 (earlier empty slots first)."""
    order = torch.argsort((seg >= 0).to(torch.int8), dim=1, stable=True)[:, -window:]
    out = [torch.gather(seg, 1, order)]
    for t in tensors:
        out.append(torch.gather(t, 1, order[..., None].expand(-1, -1, t.shape[-1])))
    return out


class SeqBoatMixer(nn.Module):
    kind = "seqboat"
    owns_residual = True

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d = config.hidden_size
        self.window = config.seqboat_window
        self.z_dim = config.seqboat_z_dim
        self.v_dim = config.seqboat_v_dim
        self.rope_theta = config.rope_theta
        self.norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.ema = DampedEMA(d, config.ema_dim)
        self.mx_proj = nn.Linear(d, 2 + d)
        self.log_tau = nn.Parameter(torch.zeros(1))  # shape (1,): DeepSpeed cannot broadcast 0-d parameters
        self.gau_proj = nn.Linear(d, self.z_dim + 2 * self.v_dim)
        self.qk_gamma = nn.Parameter(torch.empty(2, self.z_dim))
        self.qk_beta = nn.Parameter(torch.zeros(2, self.z_dim))
        self.h_proj = nn.Linear(self.v_dim, d)
        self.h_weight = nn.Parameter(torch.ones(d))
        self.last_activation_ratio: torch.Tensor | None = None
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        # Inside deepspeed.zero.Init the EMA child is partitioned by now; it initialised itself
        # before that (and a checkpoint's weights replace every value anyway).
        if not zero3_partitioned(self.ema):
            self.ema.reset_ssm_parameters()
        nn.init.normal_(self.qk_gamma, 1.0, 0.02)
        self.qk_beta.zero_()
        self.log_tau.zero_()
        self.h_weight.fill_(1.0)

    def route(self, m: torch.Tensor):
        """m (B, L, D) -> activated (B, L) bool, winning probability of option 1 (B, L), hx (B, L, D)."""
        u, hx = torch.split(self.mx_proj(m), [2, m.shape[-1]], -1)
        pi = torch.softmax(u.float() / torch.exp(self.log_tau.float()), -1)
        return pi[..., 1] > pi[..., 0], pi[..., 1].to(m.dtype), hx

    def forward(self, hidden_states, *, position_ids, cache=None, cu_seqlens=None, stack_tree=None, token_mask=None, **kwargs):
        """token_mask (B, L) bool or None: pads (False) feed nothing into the EMA state and are never
        activated, so they take no slot of the GAU window and no prefix entry of the cache."""
        x = hidden_states
        batch, length, _ = x.shape
        entry = cache.layer(self.layer_idx) if cache is not None else None
        x_hat = self.norm(x)
        ema_out, ema_state = self.ema(
            x_hat, self.kernels, cu_seqlens, entry.get("ema") if entry is not None else None, stack_tree, token_mask
        )
        m = F.silu(ema_out)
        active, prob, hx = self.route(m)
        if token_mask is None:
            self.last_activation_ratio = active.float().mean().detach()
        else:
            active = active & token_mask
            self.last_activation_ratio = (active.sum() / token_mask.sum().clamp_min(1)).float().detach()

        # Pack activated tokens to the front of each row (stable: original order kept).
        counts = active.sum(1)
        num_packed = int(counts.max()) if length else 0
        order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :num_packed]
        valid = torch.arange(num_packed, device=x.device)[None] < counts[:, None]
        seg = segment_ids(batch, length, cu_seqlens, x.device)
        seg_p = torch.where(valid, torch.gather(seg, 1, order), torch.full_like(order, -1))
        pos_p = torch.gather(position_ids.expand(batch, length), 1, order)
        m_p = torch.gather(m, 1, order[..., None].expand(-1, -1, m.shape[-1]))

        z, r, v = torch.split(F.silu(self.gau_proj(m_p)), [self.z_dim, self.v_dim, self.v_dim], -1)
        q = z * self.qk_gamma[0] + self.qk_beta[0]
        k = z * self.qk_gamma[1] + self.qk_beta[1]
        cos, sin = rotary_cos_sin(pos_p, self.z_dim, self.rope_theta, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        prefix = (entry.get("prefix_k"), entry.get("prefix_v"), entry.get("prefix_seg")) if entry else (None,) * 3
        # With a <bkspc> tree the window counts activated ancestors: slots carry their flat token index.
        tree_kw = {} if stack_tree is None else {"tree": stack_tree, "tree_index": torch.where(valid, order + length * torch.arange(batch, device=x.device)[:, None], -1)}
        o = self.kernels["local_attention"](
            q, k, v, seg_p, self.window, 1.0 / math.sqrt(self.z_dim),
            prefix_k=prefix[0], prefix_v=prefix[1], prefix_seg=prefix[2], **tree_kw,
        )
        h_p = self.h_proj(o * r) * torch.gather(prob, 1, order)[..., None] * valid[..., None]
        h = torch.zeros_like(x).scatter(1, order[..., None].expand(-1, -1, x.shape[-1]), h_p)

        if entry is not None:
            entry["ema"] = ema_state
            if prefix[0] is not None:
                seg_all = torch.cat([prefix[2], seg_p], 1)
                k_all, v_all = torch.cat([prefix[0], k], 1), torch.cat([prefix[1], v], 1)
            else:
                seg_all, k_all, v_all = seg_p, k, v
            entry["prefix_seg"], entry["prefix_k"], entry["prefix_v"] = _keep_last_valid(
                seg_all, self.window, k_all, v_all
            )
        return F.silu(hx + self.h_weight * h + x)
