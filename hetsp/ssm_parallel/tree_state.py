"""State passing across a group's zigzag shards on `<bkspc>` sequences (REFERENCE.md section 4).

Every token has a parent (hetsp/backspace.py); a recurrence advances from the parent's
state. Each rank scans each local segment (one zigzag chunk) from a zero state as a tree
(models/kernels/tree.py) with the parents outside the segment cut off. A token's *anchor*
is its first ancestor outside its own segment: the true state is

    h_t = local_t + decay_t * h_anchor(t)

with decay_t the product of the decays along t's in-segment ancestors-or-self (linear in
the incoming state, as in plain state passing). The anchors are the "open" stack entries
that later chunks branch from (usually one or two per segment). Each rank sends, per local
segment, (decay, local state) of its tokens that are anchors of other segments' tokens, in a
fixed number of slots (the maximum over the group, known to every rank from the structure);
after one all-gather every rank folds them in token order
(h_e = local_e + decay_e * h_anchor(e), anchors come first) and corrects its outputs.

A causal convolution reads the last K-1 ancestors: the rows of ancestors in other segments
travel the same way (the tokens other segments read, in fixed slots per segment).

Everything static (anchors, slots, the fold order) is a pure function of the structure and
the layouts, cached on the shard context. Legend: T local tokens, S local segments,
E slots per segment, X exported tokens of the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hetsp.ssm_parallel.comm import GroupSpec, group_all_gather
from hetsp.ssm_parallel.segments import local_segments


@dataclass(frozen=True)
class TreePlan:
    """The static plan of one rank (see the module docstring).

    local_parents: (T,) each local token's parent as a local index when it lies in the same
                   segment, else -1 (the local tree every segment is scanned with).
    anchor_row:    (T,) row of the token's anchor in the folded table (0: no anchor, zero state).
    steps:         (T,) in-segment ancestors-or-self of each token (the power of a time-invariant decay).
    exported:      local indices of this rank's exported tokens (anchors of other segments' tokens), sorted.
    export_pick:   (S * E,) index into `exported` of the token sent in each slot, -1 for an empty slot.
    fold_slot:     per exported token of the group, in token order: its slot in the gathered [d * S * E].
    fold_anchor:   per exported token: the table row of its own anchor (0: none).
    """

    local_parents: tuple[int, ...]
    anchor_row: tuple[int, ...]
    steps: tuple[int, ...]
    exported: tuple[int, ...]
    export_pick: tuple[int, ...]
    num_slots: int
    fold_slot: tuple[int, ...]
    fold_anchor: tuple[int, ...]


def _owners(structure, layouts):
    """Per packed token: (rank, segment, local index); per rank its segments."""
    d = len(layouts)
    owner: list = [None] * len(structure)
    segs = []
    for r, lay in enumerate(layouts):
        seg = local_segments(tuple(lay.lengths), d, r)
        segs.append(seg)
        for k in range(seg.num_segments):
            for i in range(seg.offset[k], seg.offset[k] + seg.length[k]):
                owner[lay.token_index[i]] = (r, k, i)
    return owner, segs


def _slots(wanted: set[int], owner, segs) -> tuple[dict[int, int], int]:
    """Slot (in the gathered [d * S * E]) of every wanted token, and E (at least 1)."""
    per_seg: dict[tuple[int, int], list[int]] = {}
    for g in sorted(wanted):
        per_seg.setdefault(owner[g][:2], []).append(g)
    num_slots = max([len(v) for v in per_seg.values()] + [1])
    num_segments = segs[0].num_segments
    slot = {}
    for (r, k), toks in per_seg.items():
        for e, g in enumerate(toks):
            slot[g] = (r * num_segments + k) * num_slots + e
    return slot, num_slots


def _export_local(slot: dict[int, int], owner, rank: int, num_segments: int, num_slots: int) -> tuple[int, ...]:
    out = [-1] * (num_segments * num_slots)
    base = rank * num_segments * num_slots
    for g, s in slot.items():
        if owner[g][0] == rank:
            out[s - base] = owner[g][2]
    return tuple(out)


def build_tree_plan(structure, layouts, rank: int) -> TreePlan:
    """The `TreePlan` of `rank` for the group's packed structure and every rank's layout (pure)."""
    owner, segs = _owners(structure, layouts)
    par = structure.parents
    n = len(par)
    anchor, steps = [-1] * n, [1] * n
    for g in range(n):  # parents come before their tokens
        p = par[g]
        if p >= 0 and owner[p][:2] == owner[g][:2]:
            anchor[g], steps[g] = anchor[p], steps[p] + 1
        else:
            anchor[g] = p
    exported = sorted({a for a in anchor if a >= 0})
    row = {g: i + 1 for i, g in enumerate(exported)}
    slot, num_slots = _slots(set(exported), owner, segs)
    lay = layouts[rank]
    local_parents = []
    for g in lay.token_index:
        p = par[g]
        local_parents.append(owner[p][2] if p >= 0 and owner[p][:2] == owner[g][:2] else -1)
    slot_local = _export_local(slot, owner, rank, segs[0].num_segments, num_slots)
    mine = sorted(i for i in slot_local if i >= 0)
    where = {i: x for x, i in enumerate(mine)}
    return TreePlan(
        local_parents=tuple(local_parents),
        anchor_row=tuple(row.get(anchor[g], 0) for g in lay.token_index),
        steps=tuple(steps[g] for g in lay.token_index),
        exported=tuple(mine),
        export_pick=tuple(where.get(i, -1) for i in slot_local),
        num_slots=num_slots,
        fold_slot=tuple(slot[g] for g in exported),
        fold_anchor=tuple(row.get(anchor[g], 0) for g in exported),
    )


@dataclass(frozen=True)
class ConvPlan:
    """Where each tap of a causal convolution reads on one rank (K-1 ancestors across segments).

    sources: per tap 0..K-1 (tap K-1 is the token itself), (T,) index into
             [local rows (T); gathered rows (d * S * E); zero row].
    export_local: (S * E,) local index of the row sent in each slot, -1 for an empty slot.
    """

    sources: tuple[tuple[int, ...], ...]
    export_local: tuple[int, ...]
    num_slots: int


def build_conv_plan(structure, layouts, rank: int, kernel_size: int) -> ConvPlan:
    """The `ConvPlan` of `rank` for a kernel of `kernel_size` taps (pure)."""
    owner, segs = _owners(structure, layouts)
    par = structure.parents
    lay = layouts[rank]
    chains = []
    wanted: set[int] = set()
    for g in lay.token_index:
        chain = [g]
        for _ in range(kernel_size - 1):
            chain.append(par[chain[-1]] if chain[-1] >= 0 else -1)
        chains.append(chain)
    for r, other in enumerate(layouts):  # every rank's needs decide the slots
        for g in other.token_index:
            a = g
            for _ in range(kernel_size - 1):
                a = par[a]
                if a < 0:
                    break
                if owner[a][:2] != owner[g][:2]:
                    wanted.add(a)
    slot, num_slots = _slots(wanted, owner, segs)
    num_tokens = lay.num_tokens
    zero = num_tokens + len(layouts) * segs[0].num_segments * num_slots
    sources = []
    for tap in range(kernel_size):
        m = kernel_size - 1 - tap
        col = []
        for chain in chains:
            g, a = chain[0], chain[m]
            if a < 0:
                col.append(zero)
            elif owner[a][:2] == owner[g][:2]:
                col.append(owner[a][2])
            else:
                col.append(num_tokens + slot[a])
        sources.append(tuple(col))
    return ConvPlan(tuple(sources), _export_local(slot, owner, rank, segs[0].num_segments, num_slots), num_slots)


def tree_plan(shard) -> TreePlan:
    key = ("tree_state_plan",)
    if key not in shard._steps:
        shard._steps[key] = build_tree_plan(shard.tree.structure, shard.layouts, int(shard.rank_in_group))
    return shard._steps[key]


def conv_plan(shard, kernel_size: int) -> ConvPlan:
    key = ("tree_conv_plan", kernel_size)
    if key not in shard._steps:
        shard._steps[key] = build_conv_plan(shard.tree.structure, shard.layouts, int(shard.rank_in_group), kernel_size)
    return shard._steps[key]


def local_tree(shard, device):
    """The `StackTree` of this rank's tokens with every parent outside the token's segment cut off."""
    from models.kernels.tree import StackTree

    key = ("tree_state_local", str(device))
    if key not in shard._steps:
        shard._steps[key] = StackTree(torch.tensor(tree_plan(shard).local_parents, dtype=torch.long, device=device)[None])
    return shard._steps[key]


def _long(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _slot_rows(x: torch.Tensor, pick: tuple[int, ...]) -> torch.Tensor:
    """``[T, *F] -> [S * E, *F]``: the picked rows in their slots, zeros in empty ones."""
    idx = _long(pick, x.device)
    table = torch.cat([x, x.new_zeros((1, *x.shape[1:]))], 0)
    return table.index_select(0, torch.where(idx >= 0, idx, x.shape[0]))


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def gather_slots(x_TF: torch.Tensor, pick: tuple[int, ...], group: GroupSpec) -> torch.Tensor:
    """``[T, *F] -> [d * S * E, *F]``: every rank's rows `x_TF[pick]` in its slots (zeros where pick
    is -1), in slot order (differentiable)."""
    payload = _real(_slot_rows(x_TF, pick))
    gathered = group_all_gather(payload.contiguous(), group)
    gathered = gathered.reshape(-1, *payload.shape[1:])
    return torch.view_as_complex(gathered.contiguous()) if x_TF.is_complex() else gathered


def pass_tree_states(decay_XA: torch.Tensor, state_XS: torch.Tensor, plan: TreePlan, group: GroupSpec) -> torch.Tensor:
    """``[1 + X_group, *S]``: the true state of every exported token of the group (row 0: zero).

    decay_XA ``[X, *A]`` (A a prefix of S) and state_XS ``[X, *S]``: for this rank's exported tokens
    (`plan.exported`), the decay from the token's anchor and its local state from zero. Every rank
    of the group must call this, with the same trailing shapes.
    """
    dtype = torch.promote_types(decay_XA.dtype, state_XS.dtype)
    a_shape, s_shape = decay_XA.shape[1:], state_XS.shape[1:]
    num = decay_XA.shape[0]
    na = math.prod(a_shape)
    flat = torch.cat([decay_XA.to(dtype).reshape(num, na), state_XS.to(dtype).reshape(num, math.prod(s_shape))], 1)
    gathered = gather_slots(flat, plan.export_pick, group)  # [d * S * E, A + S]
    decays = gathered[:, :na].reshape(-1, *a_shape, *([1] * (len(s_shape) - len(a_shape))))
    states = gathered[:, na:].reshape(-1, *s_shape)
    # The only sequential step: exported tokens in token order, each after its anchor.
    rows = [states.new_zeros(s_shape)]
    for s, a in zip(plan.fold_slot, plan.fold_anchor):
        rows.append(states[s] if a == 0 else states[s] + decays[s] * rows[a])
    # A zero dependence on every gathered slot, so the mirror exchange runs in backward on every rank.
    rows[0] = rows[0] + 0 * _real(gathered).sum().to(rows[0].dtype)
    return torch.stack(rows)
