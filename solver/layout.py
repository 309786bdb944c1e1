"""Turn packed micro-batches into a concrete `Plan`: groups to contiguous rank ranges.

Large groups are placed first; with `ranks_per_node` set, a group that fits
in a node is kept inside one (its ring then runs on intra-node links) when
the sizes allow it, else groups are laid out back to back.
"""

from __future__ import annotations

from typing import Sequence

from hetsp.plan import Group, MicroBatch, Plan

from .pack import MicroBatchLoad


def place_groups(sizes: Sequence[int], num_ranks: int, ranks_per_node: int = 0) -> list[int]:
    """Start rank of each group (same order as `sizes`); groups are disjoint and inside [0, num_ranks).

    Raises ValueError if the sizes add up to more than `num_ranks`.
    """
    if sum(sizes) > num_ranks:
        raise ValueError(f"groups of sizes {list(sizes)} need {sum(sizes)} ranks, only {num_ranks} exist")
    order = sorted(range(len(sizes)), key=lambda k: -sizes[k])
    rpn = ranks_per_node if 0 < ranks_per_node < num_ranks else 0
    if rpn:
        starts = _node_aware(sizes, order, num_ranks, rpn)
        if starts is not None:
            return starts
    starts = [0] * len(sizes)
    r = 0
    for k in order:
        starts[k] = r
        r += sizes[k]
    return starts


def _node_aware(sizes, order, num_ranks, rpn) -> list[int] | None:
    """Groups (largest first) on whole nodes, then best fit into nodes' free tails; None if stuck.

    Every node fills from its first rank, so its free ranks are always a suffix.
    """
    num_nodes = -(-num_ranks // rpn)
    node_size = [min(rpn, num_ranks - k * rpn) for k in range(num_nodes)]
    used = [0] * num_nodes
    starts = [0] * len(sizes)
    next_empty = 0  # nodes before this one are (partly) used: large groups come first
    for k in order:
        n = sizes[k]
        if n >= rpn:
            node = next_empty
            if node >= num_nodes or node * rpn + n > num_ranks:
                return None
            starts[k] = node * rpn
            full, rest = divmod(n, rpn)
            for m in range(node, node + full):
                used[m] = node_size[m]
            if rest:
                used[node + full] = rest
            next_empty = node + full + (1 if rest else 0)
        else:
            best = None
            for m in range(num_nodes):
                room = node_size[m] - used[m]
                if room >= n and (best is None or room < best[0]):
                    best = (room, m)
            if best is None:
                return None
            m = best[1]
            starts[k] = m * rpn + used[m]
            used[m] += n
            next_empty = max(next_empty, m + 1) if used[m] and m >= next_empty else next_empty
    return starts


def to_plan(lengths: Sequence[int], mbs: list[MicroBatchLoad], num_ranks: int, ranks_per_node: int = 0) -> Plan:
    """A `Plan` from packed micro-batches (empty groups and micro-batches dropped), validated."""
    out = []
    for mb in mbs:
        groups = [g for g in mb.groups if g.seqs]
        if not groups:
            continue
        starts = place_groups([g.d for g in groups], num_ranks, ranks_per_node)
        pairs = sorted(zip(starts, groups), key=lambda x: x[0])
        out.append(MicroBatch(tuple(Group(a, g.d, tuple(sorted(g.seqs))) for a, g in pairs)))
    return Plan(tuple(lengths), tuple(out)).validate(num_ranks)
