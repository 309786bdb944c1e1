"""Planning during training: rank 0 plans step t+1 in the background while step t trains.

The planner (from `solver`, by name) sees the batch's lengths, the cluster and
the model's shape (with the tokenizer's vocabulary and the ZeRO stage filled in);
the plan is broadcast to every rank as JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from hetsp.config import Config
from hetsp.plan import Plan

log = logging.getLogger("hetsp.planning")


class PeerFailed(RuntimeError):
    """Another rank failed (here: the planner on rank 0); this rank stops instead of waiting for it."""


def is_fallback(plan: Plan) -> bool:
    """The MILP planner returned its heuristic plan instead of a solved one (no time left, no solution);
    for the heuristic planners (greedy, static, ...) "heuristic" is their normal status."""
    return "fallback" in plan.meta or (plan.meta.get("planner") == "milp" and plan.meta.get("status") == "heuristic")


def planner_config(cfg: Config, on_gpu: bool) -> Any:
    """`cfg.planner` with the run's training settings the cost models need filled into its
    options (unless set there): "zero_stage", "dtype" (`hetsp.memory.run_dtype`) and
    "activation_checkpointing". Training, the dry run and ``hetsp-plan --config`` all plan with it."""
    from hetsp.memory import run_dtype

    options = dict(cfg.planner.options)
    options.setdefault("zero_stage", cfg.train.zero_stage)
    options.setdefault("dtype", run_dtype(cfg.train.dtype, on_gpu))
    options.setdefault("activation_checkpointing", cfg.train.activation_checkpointing)
    return dataclasses.replace(cfg.planner, options=options)


def make_planner(cfg: Config, vocab_size: int, on_gpu: bool | None = None) -> Any:
    """The configured planner, told the real vocabulary size and the run's training settings
    (`planner_config`); `on_gpu` None: whether this process sees CUDA."""
    import solver

    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab_size)
    return solver.get_planner(cfg.planner.name, planner_config(cfg, on_gpu), cfg.cluster, model)


def profile_hardware_note(planner: Any, world_size: int) -> str | None:
    """How the measured profile's hardware differs from this machine's (None: same, or no profile in use)."""
    if planner.cfg.cost_model != "profile" or planner.name == "random":
        return None
    import torch

    from hetsp.metrics.device import device_name
    from solver.costs.profile import hardware_here

    device = device_name("cuda") if torch.cuda.is_available() else "cpu"
    return planner.cost_model(world_size).hardware_mismatch(hardware_here(device or "cpu"))


class Planning:
    """Rank 0 plans step t+1 in a background thread while step t trains; plans are broadcast."""

    def __init__(self, cfg: Config, data: Any, world_size: int, rank: int):
        self.rank = rank
        self.world_size = world_size
        self.data = data
        self._pending: dict[int, Future] = {}
        self._pool = None
        self.num_plans = 0
        self.fallbacks: list[tuple[int, str]] = []  # (step, why) of every heuristic fallback
        if rank == 0:
            self.planner = make_planner(cfg, data.vocab_size)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="hetsp-planner")
            note = profile_hardware_note(self.planner, world_size)
            if note:
                log.warning("%s: its times may not hold here. Re-measure it on this machine: hetsp-launch "
                            "--simulate %d CONFIG --profile OUT.json, then set planner.profile_path = OUT.json",
                            note, world_size)

    def _plan_lengths(self, lengths: list[int], bundles: list[list[int]] | None = None) -> Any:
        t0 = time.perf_counter()
        plan = self.planner.plan(lengths, self.world_size, bundles)
        plan.meta.setdefault("wall_s", time.perf_counter() - t0)
        return plan

    def prefetch(self, step: int) -> None:
        if self._pool is not None and step not in self._pending:
            lengths = self.data.train_batch_lengths(step)
            # data whose sequences come in bundles (CoPG) says which must share a micro-batch
            bundles_of = getattr(self.data, "train_batch_bundles", None)
            bundles = bundles_of(step) if bundles_of is not None else None
            self._pending[step] = self._pool.submit(self._plan_lengths, lengths, bundles)

    def plan_for(self, step: int, sequences: list | None = None, bundles: list[list[int]] | None = None) -> Any:
        """The plan of training step `step` (or, with `sequences`, of that batch), on every rank."""
        import torch.distributed as dist

        payload: list[Any] = [None]
        failure = None
        if self.rank == 0:
            try:
                if sequences is not None:
                    plan = self._plan_lengths([len(s) for s in sequences], bundles)
                else:
                    self.prefetch(step)
                    plan = self._pending.pop(step).result()
                payload = [plan.to_json()]
                self._count(step, plan)
            except Exception as e:  # every rank hears of it now, not at the distributed timeout
                failure = e
                payload = [{"error": f"{type(e).__name__}: {e}"}]
        dist.broadcast_object_list(payload, src=0)
        if failure is not None:
            raise failure
        if isinstance(payload[0], dict):
            raise PeerFailed(f"the planner failed on rank 0 (step {step}): {payload[0]['error']}")
        return Plan.from_json(payload[0]).validate(self.world_size)

    def _count(self, step: int, plan: Plan) -> None:
        self.num_plans += 1
        if is_fallback(plan):
            self.fallbacks.append((step, str(plan.meta.get("fallback", plan.meta.get("status")))))

    def fallback_summary(self) -> str | None:
        """One line for the console: how often the planner fell back to its heuristic plan (None: never)."""
        if not self.fallbacks:
            return None
        step, why = self.fallbacks[0]
        return (f"planner {self.planner.name!r} fell back to its heuristic plan for {len(self.fallbacks)} of "
                f"{self.num_plans} batches (first at step {step}: {why}); raise planner.time_limit_s to give the "
                "solver more time (plans.jsonl has every plan's status)")

    @staticmethod
    def kept(plan: Plan, sequences: list[list[int]]) -> list[list[int]]:
        """The batch as the plan indexes it: a planner that drops sequences that cannot
        fit (planner.long_policy = "drop") records which ones it trains in the plan."""
        if plan.dropped:
            log.warning("planner dropped %d sequence(s) that fit no group: %s", len(plan.dropped), list(plan.dropped))
        kept = plan.inputs_trained(sequences)
        bad = [j for j, (seq, n) in enumerate(zip(kept, plan.lengths)) if len(seq) != n]
        if bad:
            raise ValueError(f"plan sequence {bad[0]} has {plan.lengths[bad[0]]} tokens but the batch's has {len(kept[bad[0]])}")
        return kept

    def close(self) -> None:
        summary = self.fallback_summary() if self.rank == 0 else None
        if summary:
            log.warning("%s", summary)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
