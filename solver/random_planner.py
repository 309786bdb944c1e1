"""The `random` planner: any valid plan, deterministic in (seed, lengths). Ignores memory.

Used by the runtime's invariant tests (a plan changes speed, never math):
random group sizes (odd ones included), a random number of micro-batches,
groups left empty, ranks left idle.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from hetsp.plan import Group, MicroBatch, Plan

from .base import Planner


def random_plan(lengths: list[int], num_ranks: int, seed: int, bundles: list[list[int]] | None = None) -> Plan:
    """A random valid plan for `lengths` on `num_ranks` ranks, a pure function of its arguments.

    With `bundles`, a bundle's first sequence picks a random group and the others random groups
    of the same micro-batch (so bundles are split over groups as often as not)."""
    key = hashlib.sha256(f"{seed}:{','.join(map(str, lengths))}:{num_ranks}".encode()).digest()
    rng = random.Random(int.from_bytes(key[:8], "little"))
    n = len(lengths)
    num_mb = rng.randint(1, max(1, min(n + 1, 4)))
    mbs_groups: list[list[tuple[int, int]]] = []
    for _ in range(num_mb):
        groups = []
        r = 0
        while r < num_ranks:
            size = rng.randint(1, num_ranks - r)
            if rng.random() < 0.2:  # leave these ranks idle in this micro-batch
                r += size
                continue
            groups.append((r, size))
            r += size
        mbs_groups.append(groups)
    slots = [(m, j) for m, gs in enumerate(mbs_groups) for j in range(len(gs))]
    if not slots:  # every micro-batch left idle: give the first one a group
        size = rng.randint(1, num_ranks)
        start = rng.randint(0, num_ranks - size)
        mbs_groups[0] = [(start, size)]
        slots = [(0, 0)]
    seqs: dict[tuple[int, int], list[int]] = {s: [] for s in slots}
    for b in bundles if bundles is not None else [[i] for i in range(n)]:
        first = rng.choice(slots)
        seqs[first].append(b[0])
        same_mb = [s for s in slots if s[0] == first[0]]
        for i in b[1:]:
            seqs[rng.choice(same_mb)].append(i)
    mbs = [
        MicroBatch(tuple(Group(start, size, tuple(sorted(seqs[(m, j)]))) for j, (start, size) in enumerate(gs)))
        for m, gs in enumerate(mbs_groups)
    ]
    return Plan(tuple(lengths), tuple(mbs))


class RandomPlanner(Planner):
    name = "random"
    uses_memory = False

    def _plan(self, lengths: list[int], num_ranks: int) -> tuple[Plan, str, dict[str, Any]]:
        return random_plan(lengths, num_ranks, self.cfg.seed), "random", {}

    def _plan_bundled(self, lengths: list[int], bundles: list[list[int]], num_ranks: int) -> tuple[Plan, str, dict[str, Any]]:
        return random_plan(lengths, num_ranks, self.cfg.seed, bundles), "random", {}
