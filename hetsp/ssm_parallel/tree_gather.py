"""Exact sequence parallelism for a mixer on `<bkspc>` sequences: gather, run whole, keep own rows.

A token's parent may lie on any earlier chunk of the group, so the mixer's input rows
of the whole group are gathered (differentiable: the backward reduce-scatters), the
mixer runs once on the group's packed sequences with their stack tree
(models/kernels/tree.py), and a forward hook keeps this rank's rows. Every rank of the
group computes the same whole mixer; the loss of each rank reaches the parameters only
through its own rows, so gradients summed over ranks are exact.

Legend: T local tokens, N packed tokens of the group, D width.
"""

from __future__ import annotations

import torch

from hetsp.ssm_parallel.comm import GroupSpec, group_all_gather

_ROWS = "_hetsp_tree_rows"


def _tables(shard, device):
    """(index of every packed token in the gathered [d * T_max] rows, this rank's packed indices,
    packed document bounds, packed parents (1, N), packed depths (1, N)), cached on the shard."""
    key = ("tree_gather", str(device))
    cache = shard._steps
    if key not in cache:
        layouts = shard.layouts
        t_max = max(lay.num_tokens for lay in layouts)
        total = sum(layouts[0].lengths)
        src = [0] * total
        for r, lay in enumerate(layouts):
            for i, g in enumerate(lay.token_index):
                src[g] = r * t_max + i
        bounds = [0]
        for n in layouts[0].lengths:
            bounds.append(bounds[-1] + n)
        structure = shard.tree.structure
        as_long = dict(dtype=torch.long, device=device)
        cache[key] = (
            t_max,
            torch.tensor(src, **as_long),
            torch.tensor(shard.layout.token_index, **as_long),
            torch.tensor(bounds, dtype=torch.int32, device=device),
            torch.tensor(structure.parents, **as_long)[None],
            torch.tensor(structure.depths, **as_long)[None],
        )
    return cache[key]


def gather_packed(x_TD: torch.Tensor, shard) -> torch.Tensor:
    """``[T, *F] -> [N, *F]``: the group's rows in packed order (differentiable)."""
    t_max, src, _, _, _, _ = _tables(shard, x_TD.device)
    pad = x_TD.new_zeros((t_max - x_TD.shape[0], *x_TD.shape[1:]))
    gathered = group_all_gather(torch.cat([x_TD, pad], 0), GroupSpec.of(shard))
    return gathered.reshape(-1, *x_TD.shape[1:]).index_select(0, src)


def pre_hook(mixer, args, kwargs, shard):
    """Forward pre-hook body: replace the mixer's input by the group's packed rows and the tree."""
    from models.kernels.tree import StackTree

    hidden = args[0] if args else kwargs["hidden_states"]
    if hidden.shape[0] != 1:
        raise ValueError(f"sequence-parallel <bkspc> sequences take one packed row, got batch {hidden.shape[0]}")
    _, _, own, bounds, parents, depths = _tables(shard, hidden.device)
    full = gather_packed(hidden[0], shard)[None]
    key = ("tree_gather_tree", str(hidden.device))
    if key not in shard._steps:
        shard._steps[key] = StackTree(parents)
    kwargs = dict(kwargs, cu_seqlens=bounds, stack_tree=shard._steps[key], position_ids=depths)
    setattr(mixer, _ROWS, own)
    if args:
        return (full, *args[1:]), kwargs
    kwargs["hidden_states"] = full
    return args, kwargs


def post_hook(mixer, output):
    """Forward hook body: keep this rank's rows (None when the mixer did not run whole)."""
    own = getattr(mixer, _ROWS, None)
    if own is None:
        return None
    setattr(mixer, _ROWS, None)
    return output.index_select(1, own)
