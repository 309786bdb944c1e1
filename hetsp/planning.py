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


def make_planner(cfg: Config, vocab_size: int) -> Any:
    """The configured planner, told the real vocabulary size and the ZeRO stage."""
    import solver

    model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab_size)
    options = dict(cfg.planner.options)
    options.setdefault("zero_stage", cfg.train.zero_stage)
    planner_cfg = dataclasses.replace(cfg.planner, options=options)
    return solver.get_planner(cfg.planner.name, planner_cfg, cfg.cluster, model)


class Planning:
    """Rank 0 plans step t+1 in a background thread while step t trains; plans are broadcast."""

    def __init__(self, cfg: Config, data: Any, world_size: int, rank: int):
        self.rank = rank
        self.world_size = world_size
        self.data = data
        self._pending: dict[int, Future] = {}
        self._pool = None
        if rank == 0:
            self.planner = make_planner(cfg, data.vocab_size)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="hetsp-planner")

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

        payload = [None]
        if self.rank == 0:
            if sequences is not None:
                plan = self._plan_lengths([len(s) for s in sequences], bundles)
            else:
                self.prefetch(step)
                plan = self._pending.pop(step).result()
            payload = [plan.to_json()]
        dist.broadcast_object_list(payload, src=0)
        return Plan.from_json(payload[0]).validate(self.world_size)

    @staticmethod
    def kept(plan: Plan, sequences: list[list[int]]) -> list[list[int]]:
        """The batch as the plan indexes it: a planner that drops sequences that cannot
        fit (planner.long_policy = "drop") records which ones it kept in meta["source_index"]."""
        index = plan.meta.get("source_index")
        if index is None:
            return sequences
        if plan.meta.get("dropped"):
            log.warning("planner dropped %d sequence(s) that fit no group: %s", len(plan.meta["dropped"]), plan.meta["dropped"])
        return [sequences[i] for i in index]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
