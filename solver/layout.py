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
    free = [True] * num_ranks
    starts = [0] * len(sizes)

    def take(a, n):
        for r in range(a, a + n):
            free[r] = False

    def find(n, aligned_to_nodes_only):
        # A start where n free ranks follow; for n <= rpn, one that stays within a node.
        for a in range(0, num_ranks - n + 1):
            if aligned_to_nodes_only and n <= rpn and a // rpn != (a + n - 1) // rpn:
                continue
            if all(free[a : a + n]):
                return a
        return None

    for k in order:
        n = sizes[k]
        if n >= rpn:
            a = None
            for cand in range(0, num_ranks - n + 1, rpn):  # whole nodes first
                if all(free[cand : cand + n]):
                    a = cand
                    break
            if a is None:
                a = find(n, False)
        else:
            # best fit: the node with the least free space that still holds n contiguous ranks
            best = None
            for node in range(0, num_ranks, rpn):
                seg = free[node : node + rpn]
                room = sum(seg)
                for a0 in range(node, min(node + rpn, num_ranks) - n + 1):
                    if all(free[a0 : a0 + n]):
                        if best is None or room < best[0]:
                            best = (room, a0)
                        break
            a = best[1] if best else find(n, False)
        if a is None:
            return None
        starts[k] = a
        take(a, n)
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
