"""Measure the planner's cost table on the machine itself: `hetsp-launch ... --profile OUT.json`.

For every group size d and a grid of sequence lengths s, every rank runs the
real step executor on a plan whose only group is ranks [0, d) holding one
sequence of s tokens (the other ranks idle, as in training), and the
slowest rank's forward+backward time is recorded. A plan in which every rank
is idle gives the fixed cost of a micro-batch. The result is a `profile`
cost model file (solver/costs/profile.py) stamped with device, host and time.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from hetsp.plan import Group, MicroBatch, Plan

log = logging.getLogger("hetsp.profiler")


def length_grid(max_len: int, smallest: int = 128) -> list[int]:
    """Powers of two from `smallest` up to `max_len`, with `max_len` itself last."""
    grid = []
    s = smallest
    while s < max_len:
        grid.append(s)
        s *= 2
    return grid + [max_len]


def _timed(engine: Any, plan: Plan, sequences: list[list[int]], world: int, device: Any, objective: Any, kernel: str) -> float:
    from hetsp.executor import run_plan

    dist.barrier()
    t0 = time.perf_counter()
    run_plan(engine, plan, sequences, dist.get_rank(), world, device, objective, kernel)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def measure(
    engine: Any,
    objective: Any,
    vocab_size: int,
    device: Any,
    kernel: str,
    degrees: list[int],
    max_len: int,
    tokens_per_rank: int,
    repeats: int = 2,
) -> tuple[list[dict[str, Any]], float]:
    """Median fwd+bwd time per (degree, length) and the fixed cost of a micro-batch (collective call)."""
    world = dist.get_world_size()
    rng = random.Random(0)
    cases = [(d, s) for d in degrees for s in length_grid(min(max_len, tokens_per_rank * d))]
    show = dist.get_rank() == 0
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(cases) + 1, desc="profiling", unit="case")

    def median_time(plan: Plan, sequences: list[list[int]]) -> float:
        _timed(engine, plan, sequences, world, device, objective, kernel)  # warm-up
        return statistics.median(_timed(engine, plan, sequences, world, device, objective, kernel) for _ in range(repeats))

    idle = Plan((2,), (MicroBatch((Group(0, 1, (0,)),)), MicroBatch(())))
    one_token_step = median_time(idle, [[1, 2]])
    empty_only = Plan((2,), (MicroBatch((Group(0, 1, (0,)),)),))
    fixed_s = max(0.0, one_token_step - median_time(empty_only, [[1, 2]]))
    if show:
        bar.update()
    points = []
    for d, s in cases:
        seq = [rng.randrange(vocab_size) for _ in range(s)]
        plan = Plan((s,), (MicroBatch((Group(0, d, (0,)),)),))
        # A micro-batch costs fixed_s plus its groups' sequence times: keep only the latter here.
        points.append({"degree": d, "tokens": s, "time_s": max(1e-6, median_time(plan, [seq]) - fixed_s)})
        if show:
            bar.update()
            bar.set_postfix(d=d, s=s, ms=f"{points[-1]['time_s'] * 1e3:.0f}")
    if show:
        bar.close()
    return points, fixed_s
