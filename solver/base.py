"""The planner interface: lengths and a world size in, a validated `Plan` out.

Every planner subclasses `Planner` and implements `_plan(lengths, num_ranks)`;
`Planner.plan` checks the input, drops sequences that cannot fit when the
config says so, times the solve, validates the plan and fills `Plan.meta`
with at least ``planner``, ``solve_s``, ``status`` and ``est_time_s`` (the
simulated step: its micro-batches plus the cost model's per-step ``step_s``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Sequence

from hetsp.plan import Group, MicroBatch, Plan, full_bundles

if TYPE_CHECKING:  # pragma: no cover
    from hetsp.config import ClusterConfig, ModelConfig, PlannerConfig

    from .costs.base import CostModel

log = logging.getLogger("solver")


class PlanningError(ValueError):
    """An input no plan can serve (a sequence longer than any group can hold, an empty batch)."""


def check_lengths(lengths: Sequence[int]) -> list[int]:
    """Return `lengths` as a list of ints; ValueError for an empty batch or a length < 1."""
    out = []
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or int(n) != n:
            raise PlanningError(f"sequence {i} has non-integer length {n!r}")
        if n < 1:
            raise PlanningError(f"sequence {i} has length {n}; every sequence needs at least 1 token")
        out.append(int(n))
    if not out:
        raise PlanningError("empty batch: no sequence lengths to plan")
    return out


def check_num_ranks(num_ranks: int, cluster: "ClusterConfig") -> None:
    if int(num_ranks) != num_ranks or num_ranks < 1:
        raise PlanningError(f"num_ranks must be a positive integer, got {num_ranks!r}")
    rpn = cluster.ranks_per_node
    if rpn < 0:
        raise PlanningError(f"cluster.ranks_per_node must be >= 0 (0: one node), got {rpn}")
    if rpn > num_ranks:
        raise PlanningError(
            f"cluster.ranks_per_node = {rpn} is more than the {num_ranks} ranks of the world; "
            f"set it to at most {num_ranks} (or 0 for one node)"
        )


class Planner:
    """Base class. Subclasses set `name` and implement `_plan`.

    `_plan(lengths, num_ranks)` gets checked lengths (all of them fit) and
    returns ``(plan, status, extra_meta)``; `status` is a short word
    (``"heuristic"``, ``"optimal"``, ``"time_limit"``, ``"fallback"``...).
    """

    name = "base"
    uses_memory = True  # False: the planner ignores memory (random)

    def __init__(
        self,
        planner: "PlannerConfig",
        cluster: "ClusterConfig",
        model: "ModelConfig | None" = None,
    ) -> None:
        self.cfg = planner
        self.cluster = cluster
        self.model = model
        self._costs: dict[int, Any] = {}

    # ---- hooks -------------------------------------------------------------
    def max_fit_length(self, num_ranks: int) -> int | None:
        """Longest sequence this planner can place on `num_ranks` ranks (None: no limit)."""
        return None

    def _plan(self, lengths: list[int], num_ranks: int) -> tuple[Plan, str, dict[str, Any]]:
        raise NotImplementedError

    def _plan_bundled(
        self, lengths: list[int], bundles: list[list[int]], num_ranks: int
    ) -> tuple[Plan, str, dict[str, Any]]:
        """Plan a batch whose `bundles` must each share a micro-batch. Default: each bundle is one
        item of its total tokens, so it lands in one group (planners may do better)."""
        totals = [sum(lengths[s] for s in b) for b in bundles]
        plan, status, meta = self._plan(totals, num_ranks)
        return expand_bundles(plan, lengths, bundles), status, meta

    # ---- shared helpers -----------------------------------------------------
    def use_cost_model(self, cm: "CostModel") -> "Planner":
        """Use this cost model for every world size instead of building one from the config; returns self."""
        self._fixed_cost_model = cm
        return self

    def cost_model(self, num_ranks: int) -> "CostModel":
        """The configured cost model for a world of `num_ranks` (cached). Raises ValueError if unusable."""
        fixed = getattr(self, "_fixed_cost_model", None)
        if fixed is not None:
            return fixed
        if num_ranks not in self._costs:
            from .costs import build_cost_model

            self._costs[num_ranks] = build_cost_model(self.cfg, self.cluster, self.model, num_ranks)
        return self._costs[num_ranks]

    def _estimate(self, plan: Plan, num_ranks: int) -> tuple[float | None, str | None]:
        from .simulate import simulate

        try:  # a cost model may give a memory budget but no times (ring without cluster.peak_tflops)
            cm = self.cost_model(num_ranks)
            return simulate(plan, cm).total_s + cm.step_s, None
        except (ValueError, ImportError) as e:
            return None, f"no time estimate: {e}"

    # ---- the interface -------------------------------------------------------
    def plan(self, lengths: Sequence[int], num_ranks: int, bundles: Sequence[Sequence[int]] | None = None) -> Plan:
        """Plan one global batch of sequences with these `lengths` on `num_ranks` ranks.

        `bundles`: sets of sequence indices that must share a micro-batch (the completions of
        one prompt); sequences in none stand alone. With bundles, the memory limit applies to a
        bundle's total (planners other than `random` keep a bundle in one group), and
        `long_policy = "drop"` drops whole bundles.
        """
        lengths = check_lengths(lengths)
        check_num_ranks(num_ranks, self.cluster)
        try:
            all_bundles = full_bundles(bundles, len(lengths))
        except ValueError as e:
            raise PlanningError(f"bundles: {e}") from None
        if any(len(b) > 1 for b in all_bundles):
            return self._plan_with_bundles(lengths, all_bundles, num_ranks)
        t0 = time.perf_counter()
        kept = list(range(len(lengths)))
        dropped: list[int] = []
        limit = self.max_fit_length(num_ranks) if self.uses_memory else None
        if limit is not None:
            too_long = [i for i, n in enumerate(lengths) if n > limit]
            if too_long:
                policy = getattr(self.cfg, "long_policy", "error")
                if policy != "drop":
                    i = too_long[0]
                    raise PlanningError(
                        f"sequence {i} has {lengths[i]} tokens but the longest that fits on {num_ranks} ranks "
                        f"with this planner is {limit} ({len(too_long)} sequence(s) too long); shorten or split "
                        f"it (data.long_policy), add ranks or memory, or set planner.long_policy = 'drop'"
                    )
                dropped = too_long
                kept = [i for i in kept if lengths[i] <= limit]
                if not kept:  # nothing to run: the caller skips this batch (and counts it)
                    meta = {"planner": self.name, "solve_s": time.perf_counter() - t0, "status": "skipped"}
                    return Plan([], [], meta, (), len(lengths))
        work = [lengths[i] for i in kept]
        plan, status, extra = self._plan(work, num_ranks)
        solve_s = time.perf_counter() - t0
        plan.validate(num_ranks)
        est, note = self._estimate(plan, num_ranks)
        meta: dict[str, Any] = {"planner": self.name, "solve_s": solve_s, "status": status, "est_time_s": est}
        if note:
            meta["est_note"] = note
        meta.update(extra)
        meta.update({k: v for k, v in plan.meta.items() if k not in meta})
        if dropped:  # which sequences are trained is part of the plan, validated with it
            return Plan(plan.lengths, plan.micro_batches, meta, tuple(kept), len(lengths)).validate(num_ranks)
        return Plan(plan.lengths, plan.micro_batches, meta)

    def _plan_with_bundles(self, lengths: list[int], bundles: list[list[int]], num_ranks: int) -> Plan:
        t0 = time.perf_counter()
        limit = self.max_fit_length(num_ranks) if self.uses_memory else None
        kept_bundles = bundles
        dropped: list[int] = []
        if limit is not None:
            too_big = [b for b in bundles if sum(lengths[s] for s in b) > limit]
            if too_big and getattr(self.cfg, "long_policy", "error") != "drop":
                b = too_big[0]
                raise PlanningError(
                    f"bundle {b} has {sum(lengths[s] for s in b)} tokens but the most one group holds on {num_ranks} "
                    f"ranks with this planner is {limit} ({len(too_big)} bundle(s) too large); shorten its "
                    "completions, add ranks or memory, or set planner.long_policy = 'drop'"
                )
            kept_bundles = [b for b in bundles if sum(lengths[s] for s in b) <= limit]
            dropped = sorted(s for b in too_big for s in b)
            if not kept_bundles:  # nothing to run: the caller skips this batch (and counts it)
                meta = {"planner": self.name, "solve_s": time.perf_counter() - t0, "status": "skipped"}
                return Plan([], [], meta, (), len(lengths))
        kept = sorted(s for b in kept_bundles for s in b)
        new_index = {s: j for j, s in enumerate(kept)}
        work_bundles = [[new_index[s] for s in b] for b in kept_bundles]
        work = [lengths[s] for s in kept]
        plan, status, extra = self._plan_bundled(work, work_bundles, num_ranks)
        solve_s = time.perf_counter() - t0
        plan = Plan(plan.lengths, plan.micro_batches, plan.meta, bundles=tuple(tuple(b) for b in work_bundles if len(b) > 1))
        plan.validate(num_ranks)
        est, note = self._estimate(plan, num_ranks)
        meta: dict[str, Any] = {"planner": self.name, "solve_s": solve_s, "status": status, "est_time_s": est,
                                "num_bundles": len(plan.bundles)}
        if note:
            meta["est_note"] = note
        meta.update(extra)
        meta.update({k: v for k, v in plan.meta.items() if k not in meta})
        if dropped:  # which sequences are trained is part of the plan, validated with it
            return Plan(plan.lengths, plan.micro_batches, meta, tuple(kept), len(lengths),
                        bundles=plan.bundles).validate(num_ranks)
        return Plan(plan.lengths, plan.micro_batches, meta, bundles=plan.bundles)


def expand_bundles(item_plan: Plan, lengths: list[int], bundles: list[list[int]]) -> Plan:
    """The plan of the sequences from a plan whose item i stands for the sequences `bundles[i]`
    (each item's group gets all of them)."""
    mbs = []
    for mb in item_plan.micro_batches:
        groups = [Group(g.start, g.size, tuple(sorted(s for i in g.seqs for s in bundles[i]))) for g in mb.groups]
        mbs.append(MicroBatch(tuple(groups)))
    return Plan(tuple(lengths), tuple(mbs), dict(item_plan.meta), bundles=tuple(tuple(b) for b in bundles if len(b) > 1))
