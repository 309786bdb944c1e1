"""Execution plans: which ranks process which sequences of a global batch.

Pure data, no torch and no PuLP (the solver imports this module). A `Plan`
is a list of micro-batches; each micro-batch is a set of disjoint groups;
each group is a contiguous range of global ranks ``[start, start + size)``
with the indices of the batch sequences it processes. Every rank runs every
micro-batch: a rank in no group (or in a group with no sequences) still
takes part in the collectives of that micro-batch with an empty workload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence


class PlanError(ValueError):
    """A plan that cannot be executed as given."""


@dataclass(frozen=True)
class Group:
    """A contiguous range of global ranks and the sequences it processes."""

    start: int
    size: int
    seqs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "seqs", tuple(int(s) for s in self.seqs))

    @property
    def ranks(self) -> range:
        return range(self.start, self.start + self.size)

    @property
    def stop(self) -> int:
        return self.start + self.size

    def num_tokens(self, lengths: Sequence[int]) -> int:
        return sum(lengths[s] for s in self.seqs)

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "size": self.size, "seqs": list(self.seqs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Group":
        return cls(int(d["start"]), int(d["size"]), tuple(d.get("seqs", ())))


@dataclass(frozen=True)
class MicroBatch:
    groups: tuple[Group, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))

    def group_of(self, rank: int) -> Group | None:
        """The group holding `rank` in this micro-batch, or None if it is idle."""
        for g in self.groups:
            if g.start <= rank < g.stop:
                return g
        return None

    def seqs(self) -> list[int]:
        return [s for g in self.groups for s in g.seqs]


@dataclass(frozen=True)
class Plan:
    """A full plan for one global batch.

    `lengths[i]` is the token count of plan sequence i (as fed to the model,
    i.e. after any truncation). Which sequences of the input batch the plan
    trains is part of the plan: with `source_index` set, plan sequence j is
    input sequence ``source_index[j]`` of an input batch of `num_inputs`
    sequences, and the others (`dropped`) are not trained; with both None,
    plan sequence i is input sequence i and nothing is dropped. `bundles`
    lists sets of plan sequences that must share a micro-batch (the
    completions of one prompt for CoPG); empty, or bundles of one, when every
    sequence stands alone (language modelling). `meta` carries free-form
    planner information (planner name, solve time, optimality, estimated
    time); it never changes what is executed.
    """

    lengths: tuple[int, ...]
    micro_batches: tuple[MicroBatch, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    source_index: tuple[int, ...] | None = None
    num_inputs: int | None = None
    bundles: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(int(x) for x in self.lengths))
        object.__setattr__(self, "micro_batches", tuple(self.micro_batches))
        if (self.source_index is None) != (self.num_inputs is None):
            raise PlanError("a plan's source_index and num_inputs are given together (or neither)")
        object.__setattr__(self, "bundles", tuple(tuple(int(s) for s in b) for b in self.bundles))
        if self.source_index is not None:
            object.__setattr__(self, "source_index", tuple(int(i) for i in self.source_index))
            object.__setattr__(self, "num_inputs", int(self.num_inputs))

    @property
    def dropped(self) -> tuple[int, ...]:
        """Input-batch indices of the sequences this plan does not train."""
        if self.source_index is None:
            return ()
        kept = set(self.source_index)
        return tuple(i for i in range(self.num_inputs) if i not in kept)

    def inputs_trained(self, batch: Sequence[Any]) -> list[Any]:
        """The input batch as the plan indexes it (the sequences it trains, in plan order)."""
        if self.num_inputs is not None and len(batch) != self.num_inputs:
            raise PlanError(f"the plan was made for a batch of {self.num_inputs} sequences, got {len(batch)}")
        if self.source_index is None:
            if len(batch) != len(self.lengths):
                raise PlanError(f"the plan has {len(self.lengths)} sequences, the batch {len(batch)}")
            return list(batch)
        return [batch[i] for i in self.source_index]

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches)

    def groups(self) -> Iterable[Group]:
        for mb in self.micro_batches:
            yield from mb.groups

    def group_sizes(self) -> dict[int, int]:
        """How many non-empty groups of each size the plan uses."""
        counts: dict[int, int] = {}
        for g in self.groups():
            if g.seqs:
                counts[g.size] = counts.get(g.size, 0) + 1
        return dict(sorted(counts.items()))

    def validate(self, num_ranks: int) -> "Plan":
        """Check that the plan is executable on `num_ranks` ranks; return self.

        Every sequence appears exactly once, groups of one micro-batch are
        disjoint, every group lies inside [0, num_ranks) and has size >= 1.
        """
        if num_ranks < 1:
            raise PlanError(f"num_ranks must be >= 1, got {num_ranks}")
        for i, n in enumerate(self.lengths):
            if n < 1:
                raise PlanError(f"sequence {i} has length {n}; every sequence needs at least 1 token")
        seen: dict[int, tuple[int, int]] = {}
        for m, mb in enumerate(self.micro_batches):
            used = [False] * num_ranks
            for g_idx, g in enumerate(mb.groups):
                if g.size < 1:
                    raise PlanError(f"micro-batch {m} group {g_idx}: size {g.size} < 1")
                if g.start < 0 or g.stop > num_ranks:
                    raise PlanError(
                        f"micro-batch {m} group {g_idx}: ranks [{g.start}, {g.stop}) outside the world of {num_ranks}"
                    )
                for r in g.ranks:
                    if used[r]:
                        raise PlanError(f"micro-batch {m}: rank {r} is in two groups")
                    used[r] = True
                for s in g.seqs:
                    if not 0 <= s < len(self.lengths):
                        raise PlanError(f"micro-batch {m} group {g_idx}: sequence index {s} out of range")
                    if s in seen:
                        raise PlanError(f"sequence {s} appears twice (micro-batches {seen[s][0]} and {m})")
                    seen[s] = (m, g_idx)
        missing = [i for i in range(len(self.lengths)) if i not in seen]
        if missing:
            raise PlanError(f"sequences {missing[:10]}{'...' if len(missing) > 10 else ''} are in no group")
        if self.source_index is not None:
            src = self.source_index
            if len(src) != len(self.lengths):
                raise PlanError(f"source_index has {len(src)} entries for {len(self.lengths)} plan sequences")
            if any(b <= a for a, b in zip(src, src[1:])) or (src and (src[0] < 0 or src[-1] >= self.num_inputs)):
                raise PlanError(f"source_index must increase strictly inside [0, {self.num_inputs}): {list(src)[:10]}")
        self.check_bundle_placement()
        return self

    def check_bundle_placement(self, bundles: Sequence[Sequence[int]] | None = None) -> None:
        """Every bundle (the plan's own, or `bundles`) lies in one micro-batch; PlanError if not."""
        bundles = self.bundles if bundles is None else bundles
        check_bundles(bundles, len(self.lengths))
        mb_of = {s: m for m, mb in enumerate(self.micro_batches) for s in mb.seqs()}
        for b in bundles:
            where = sorted({mb_of.get(s, -1) for s in b})
            if len(where) > 1:
                raise PlanError(f"bundle {list(b)} is split over micro-batches {where}; a bundle must share one")

    # ---- JSON form (one object per plan; run folders store one per line) ----
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lengths": list(self.lengths),
            "micro_batches": [[g.to_dict() for g in mb.groups] for mb in self.micro_batches],
            "meta": self.meta,
        }
        if any(len(b) > 1 for b in self.bundles):
            out["bundles"] = [list(b) for b in self.bundles]
        if self.source_index is not None:
            out["source_index"] = list(self.source_index)
            out["num_inputs"] = self.num_inputs
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        mbs = tuple(MicroBatch(tuple(Group.from_dict(g) for g in mb)) for mb in d["micro_batches"])
        src = d.get("source_index")
        return cls(tuple(d["lengths"]), mbs, dict(d.get("meta", {})), None if src is None else tuple(src), d.get("num_inputs"),
                   bundles=tuple(tuple(b) for b in d.get("bundles", ())))

    @classmethod
    def from_json(cls, s: str) -> "Plan":
        return cls.from_dict(json.loads(s))


def check_bundles(bundles: Sequence[Sequence[int]], num_seqs: int) -> None:
    """Bundles must be non-empty and disjoint, with indices in [0, num_seqs); sequences in none
    stand alone. Raises PlanError naming the first fault."""
    owner: dict[int, int] = {}
    for k, b in enumerate(bundles):
        if not b:
            raise PlanError(f"bundle {k} is empty")
        for s in b:
            if not 0 <= s < num_seqs:
                raise PlanError(f"bundle {k} names sequence {s}, outside the batch of {num_seqs}")
            if s in owner:
                raise PlanError(f"sequence {s} is in bundles {owner[s]} and {k}")
            owner[s] = k


def full_bundles(bundles: Sequence[Sequence[int]] | None, num_seqs: int) -> list[list[int]]:
    """`bundles` completed with a bundle of one for every sequence they leave out (checked)."""
    bundles = [list(b) for b in bundles or ()]
    check_bundles(bundles, num_seqs)
    listed = {s for b in bundles for s in b}
    return bundles + [[i] for i in range(num_seqs) if i not in listed]
