"""SeqBoat's GAU window across a group's shards on `<bkspc>` sequences.

A query attends to the last W activated ancestors-or-self of its token. A token's ancestors
outside its segment are the ancestors-or-self of its anchor (tree_state.py), so what a segment
needs from before it is, per anchor e, the list of the last W activated ancestors-or-self of e
(keys and values): a fixed-size summary (W slots with a validity flag) that folds like a state,

    list(e) = last W valid of [list(anchor(e)), activated in-segment ancestors-or-self of e].

Each rank forms the in-segment part of its exported tokens' lists, one all-gather brings every
rank's, each rank folds them in token order, and runs the tree kernel on one extended row: each
run of a segment's tokens sharing an anchor (runs are contiguous in stack order) is preceded by
W virtual slots holding its anchor's list as a chain, to which the run's tokens are attached.

Legend: M packed activated slots, W window, X exported tokens, R runs, Z query/key width, E value width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetsp.ssm_parallel.comm import GroupSpec
from hetsp.ssm_parallel.segments import segments_of
from hetsp.ssm_parallel.tree_state import gather_slots, local_tree, tree_plan


@dataclass(frozen=True)
class ExtendedRow:
    """ext_of_local (T,): each local token's index in the extended row; run_rows (R,): the table row of
    each run's anchor; virtual (R * W,): the extended index of each virtual slot; parents: of the row."""

    ext_of_local: tuple[int, ...]
    run_rows: tuple[int, ...]
    virtual: tuple[int, ...]
    parents: tuple[int, ...]


def build_extended_row(plan, segments, window: int) -> ExtendedRow:
    """The extended row of one rank (pure): W virtual slots before each run of tokens with an anchor."""
    seg_of = [k for k, n in enumerate(segments.length) for _ in range(n)]
    ext_of_local, run_rows, virtual, parents = [], [], [], []
    prev, tail = None, -1
    for t, (k, row) in enumerate(zip(seg_of, plan.anchor_row)):
        if row and (k, row) != prev:
            run_rows.append(row)
            for j in range(window):
                virtual.append(len(parents))
                parents.append(len(parents) - 1 if j else -1)
            tail = len(parents) - 1  # the run's tokens whose parent is the anchor hang below its last slot
        prev = (k, row)
        ext_of_local.append(len(parents))
        p = plan.local_parents[t]
        parents.append(ext_of_local[p] if p >= 0 else (tail if row else -1))
    return ExtendedRow(tuple(ext_of_local), tuple(run_rows), tuple(virtual), tuple(parents))


def _extended(shard, window: int, device):
    from models.kernels.tree import StackTree

    key = ("seqboat_tree_row", window, str(device))
    if key not in shard._steps:
        row = build_extended_row(tree_plan(shard), segments_of(shard), window)
        as_long = dict(dtype=torch.long, device=device)
        shard._steps[key] = (
            torch.tensor(row.ext_of_local, **as_long),
            torch.tensor(row.run_rows, **as_long),
            torch.tensor(row.virtual, **as_long),
            StackTree(torch.tensor(row.parents, **as_long)[None]),
        )
    return shard._steps[key]


def _keep_last(slots_F: torch.Tensor, window: int) -> torch.Tensor:
    """The last `window` rows whose validity flag (last channel) is set, right-aligned."""
    order = torch.argsort((slots_F[:, -1] > 0.5).to(torch.int8), stable=True)[-window:]
    return slots_F.index_select(0, order)


def local_attention_tree(inner, q, k, v, window: int, scale: float, tree_index, shard, group: GroupSpec):
    """``[1, M, E]``: the kernel `inner` (tree form) for this rank's packed activated slots, each
    query seeing its last W activated ancestors-or-self across the group. Every rank calls it."""
    plan = tree_plan(shard)
    dev = q.device
    z, e = k.shape[-1], v.shape[-1]
    idx = tree_index[0]
    # In-segment part of each exported token's list: its activated ancestors-or-self, last W, right-aligned.
    exported = torch.tensor(plan.exported, dtype=torch.long, device=dev)
    anc = local_tree(shard, dev).visible(exported, idx)  # [X, M]
    from_end = anc.flip(-1).to(torch.int64).cumsum(-1).flip(-1)
    keep = anc & (from_end <= window)
    x_idx, m_idx = keep.nonzero(as_tuple=True)
    slot = window - from_end[x_idx, m_idx]
    rows = torch.cat([k[0], v[0], torch.ones_like(k[0][:, :1])], -1)  # [M, Z + E + 1]
    local = rows.new_zeros((len(plan.exported), window, z + e + 1)).index_put((x_idx, slot), rows[m_idx])
    gathered = gather_slots(local, plan.export_pick, group)  # [d * S * E, W, F]
    lists = [gathered.new_zeros((window, z + e + 1))]
    for s, a in zip(plan.fold_slot, plan.fold_anchor):
        lists.append(gathered[s] if a == 0 else _keep_last(torch.cat([lists[a], gathered[s]]), window))
    # A zero dependence on every gathered slot, so the mirror exchange runs in backward on every rank.
    lists[0] = lists[0] + 0 * gathered.sum()
    table = torch.stack(lists)  # [1 + X, W, F]
    ext_of_local, run_rows, virtual, ext_tree = _extended(shard, window, dev)
    prefix = table.index_select(0, run_rows).reshape(-1, z + e + 1)  # [R * W, F]
    v_index = torch.where(prefix[:, -1] > 0.5, virtual, torch.full_like(virtual, -1))
    l_index = torch.where(idx >= 0, ext_of_local[idx.clamp(min=0)], torch.full_like(idx, -1))
    all_index = torch.cat([l_index, v_index])
    order = torch.argsort(torch.where(all_index >= 0, all_index, ext_tree.num_tokens))  # slots in stack order
    q_all = torch.cat([q[0], q.new_zeros((prefix.shape[0], q.shape[-1]))]).index_select(0, order)
    k_all = torch.cat([k[0], prefix[:, :z].to(k.dtype)]).index_select(0, order)
    v_all = torch.cat([v[0], prefix[:, z : z + e].to(v.dtype)]).index_select(0, order)
    seg_all = all_index.index_select(0, order)
    o = inner(q_all[None], k_all[None], v_all[None], seg_all[None], window, scale, tree=ext_tree, tree_index=seg_all[None])
    inverse = torch.empty_like(order).index_put_((order,), torch.arange(order.numel(), device=dev))
    return o[:, inverse[: idx.numel()]]
