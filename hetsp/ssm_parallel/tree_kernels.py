"""Group versions of the tree kernels (models/kernels/tree.py) with state passing (tree_state.py).

Each scans this rank's segments from a zero state with the parents outside a segment cut
off, exchanges (decay, state) of the exported tokens, and adds what each token's anchor
state contributes (outputs are linear in it): for the time-invariant diagonal SSMs
``sum_n C A^steps h_anchor``, for the SSD ``exp(cum dA) C h_anchor`` with cum over the
in-segment ancestors-or-self. The causal convolution reads its K-1 ancestors from the local
rows or from the exported rows of other segments. Gradients go back through the all-gather.

Legend: T local tokens, H heads/channels, N state size, P head dim, G B/C groups, D channels.
"""

from __future__ import annotations

import torch

from hetsp.ssm_parallel.comm import GroupSpec
from hetsp.ssm_parallel.tree_state import _long, conv_plan, gather_slots, local_tree, pass_tree_states, tree_plan


def lti_scan_tree(u_TH: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, shard, group: GroupSpec) -> torch.Tensor:
    """``[T, H]`` in A's dtype: ``sum_n C h_t`` of h_t = A h_parent(t) + B u_t over the group's trees.

    A, B, C ``[H, N]`` (complex for S4D: the caller reads out 2 Re). Every rank of the group calls it.
    """
    from models.kernels.tree import tree_lti_scan

    plan = tree_plan(shard)
    dev = u_TH.device
    log_a = torch.log(A)
    if u_TH.shape[0]:
        y0, local = tree_lti_scan(u_TH.to(A.dtype), A, B, C, local_tree(shard, dev), list(plan.exported))
    else:  # the tree kernels need a token; the exchange still runs
        y0, local = u_TH.to(A.dtype), A.new_zeros((0, *A.shape))
    steps = _long(plan.steps, dev).to(log_a.real.dtype)
    decay = torch.exp(steps[_long(plan.exported, dev)][:, None, None] * log_a)  # A ** steps
    table = pass_tree_states(decay, local, plan, group)  # [1 + X, H, N]
    incoming = table.index_select(0, _long(plan.anchor_row, dev))  # [T, H, N]
    return y0 + (C * torch.exp(steps[:, None, None] * log_a) * incoming).sum(-1)


def ssd_scan_tree(x_THP: torch.Tensor, dt_TH: torch.Tensor, A_H: torch.Tensor, B_TGN: torch.Tensor, C_TGN: torch.Tensor, shard, group: GroupSpec) -> torch.Tensor:
    """``[T, H, P]``: Mamba-2's y_t = h_t C_t, h_t = exp(dt_t A) h_parent(t) + dt_t x_t B_t^T, over the group's trees.

    dt_TH is the effective step (after bias, softplus and clamping). Every rank of the group calls it.
    """
    from models.kernels.tree import tree_scan, tree_ssd_scan

    plan = tree_plan(shard)
    dev = x_THP.device
    num_tokens, num_heads, head_dim = x_THP.shape
    d_state = B_TGN.shape[-1]
    dtype = torch.promote_types(torch.promote_types(x_THP.dtype, dt_TH.dtype), torch.float32)
    rep = num_heads // B_TGN.shape[1]
    Bh = B_TGN.repeat_interleave(rep, dim=1).to(dtype)
    Ch = C_TGN.repeat_interleave(rep, dim=1).to(dtype)
    dA = dt_TH.to(dtype) * A_H.to(dtype)  # [T, H]
    exported = _long(plan.exported, dev)
    if num_tokens:
        tree = local_tree(shard, dev)
        y0, local = tree_ssd_scan(dA, dt_TH.to(dtype)[..., None] * x_THP.to(dtype), Bh, Ch, tree, list(plan.exported))
        cum = tree_scan(torch.zeros_like(dA), dA, tree)  # [T, H]: sum of dA over in-segment ancestors-or-self
    else:  # the tree kernels need a token; the exchange still runs
        y0, local, cum = x_THP.to(dtype), dA.new_zeros((0, num_heads, head_dim, d_state)), dA
    table = pass_tree_states(torch.exp(cum[exported]), local, plan, group)  # [1 + X, H, P, N]
    incoming = table.index_select(0, _long(plan.anchor_row, dev))  # [T, H, P, N]
    return y0 + torch.exp(cum)[..., None] * torch.einsum("thpn,thn->thp", incoming, Ch)


def conv_tree(x_TD: torch.Tensor, weight_DK: torch.Tensor, bias_D: torch.Tensor | None, shard, group: GroupSpec) -> torch.Tensor:
    """``[T, D]``: causal depthwise conv whose window is each token's last K-1 ancestors and itself
    (no activation). Every rank of the group calls it."""
    plan = conv_plan(shard, weight_DK.shape[1])
    x_TD = x_TD.to(weight_DK.dtype)
    gathered = gather_slots(x_TD, plan.export_local, group)  # [d * S * E, D]
    table = torch.cat([x_TD, gathered, x_TD.new_zeros((1, x_TD.shape[1]))], 0)
    # A zero dependence on every gathered row, so the mirror exchange runs in backward on every rank.
    y = 0 * gathered.sum() + (bias_D.to(x_TD.dtype) if bias_D is not None else x_TD.new_zeros(()))
    for tap, src in enumerate(plan.sources):
        y = y + table.index_select(0, _long(src, x_TD.device)) * weight_DK[:, tap]
    return y
