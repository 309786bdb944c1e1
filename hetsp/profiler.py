"""Measure the planner's cost table on the machine itself: `hetsp-launch ... --profile OUT.json`.

First the model trains the job's first batches as training does (`train_first_steps`,
`warmup_steps`: half the job's steps, at most `MAX_WARMUP_STEPS`): a model's cost
can depend on its weights, and the table must describe the model as the run trains
it, not as initialised. The hybrid model's SeqBoat layer attends over the tokens its
router activates: on the default job 60 to 80% of them at initialisation, almost
none after four updates, 6 to 15% after 60 to 90; a table measured on the initial
model predicted step times about 25% too long, one measured after four updates
those of the second half of the run about 15% too short. Training with any plan gives the same
weights (a plan changes speed, never math), so after k steps the profiled model is
the run's model at step k.

Then, for every group size d and a grid of sequence lengths s, every rank runs the
real step executor on a micro-batch as training fills one: world // d groups of
d ranks side by side, each holding one sequence of s tokens (the remaining
ranks idle), and the slowest rank's forward+backward time is recorded. Ranks
that share cores, memory bandwidth or links slow each other down; a group
measured alone would miss that (on 4 ranks sharing 2 cores, by half).
Three parts are kept apart, as the cost model adds them:
- fixed_s: a micro-batch in which every rank is idle (placeholder token);
- group_overhead_s[d]: what a group costs whatever it holds (2 tokens per rank:
  the exchanges' latency, paid once per group and micro-batch);
- points: the time a sequence of s tokens adds beyond both;
- step_s: what a step costs once whatever its plan (the gradient reduction at the
  last micro-batch, the optimizer step, the loss reduction).
Every sequence is cut from the job's own training text (`job_tokens`), not drawn at
random: SeqBoat's router activates tokens by content, and random bytes are not what
the run reads.
The result is a `profile` cost model file (solver/costs/profile.py) stamped
with the hardware (CPU model, cores, torch version, device), host and time.
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

MAX_WARMUP_STEPS = 50  # most training steps before measuring (module docstring)


def warmup_steps(train_steps: int) -> int:
    """Training steps before measuring a job of `train_steps` steps: the middle of its run, at most
    `MAX_WARMUP_STEPS`."""
    return max(0, min(MAX_WARMUP_STEPS, train_steps // 2))


def train_first_steps(ctx: Any, objective: Any, tokens_per_rank: int, steps: int) -> int:
    """Train the job's batches 0 .. steps-1 as training does (every sequence, or bundle of sequences that
    must share a micro-batch, on a group of all ranks, packed into micro-batches by `solver.static`); what
    is longer than the ranks hold is left out. The objective's hooks run as in training (`set_step`,
    `train_batch` for online samples, `step_batch` for reference log-probs or noise drawn from the
    model, `structures` for `<bkspc>` sequences); `ctx` is the objective's `RunContext` after
    `prepare_run`. Returns the steps trained (a batch with nothing that fits is skipped)."""
    from hetsp.executor import run_plan
    from solver.base import expand_bundles
    from solver.static import static_plan

    engine, data = ctx.engine, ctx.data
    world, rank = dist.get_world_size(), dist.get_rank()
    capacity = tokens_per_rank * world
    done = 0
    for step in range(steps):
        objective.set_step(step)
        made = objective.train_batch(ctx, step)  # online sampling; None: the data module's batch
        batch = data.train_batch(step) if made is None else made
        lengths = data.train_batch_lengths(step) if made is None else [len(objective.tokens(s)) for s in batch]
        bundles = [b for b in objective.bundles(batch) if sum(lengths[i] for i in b) <= capacity]
        if not bundles:
            continue
        kept = sorted(i for b in bundles for i in b)
        new = {i: j for j, i in enumerate(kept)}
        bundles = [[new[i] for i in b] for b in bundles]
        kept_lengths = [lengths[i] for i in kept]
        totals = [sum(kept_lengths[i] for i in b) for b in bundles]
        plan = expand_bundles(static_plan(totals, world, world, capacity), kept_lengths, bundles)
        sequences = objective.step_batch(ctx, plan, [batch[i] for i in kept])
        run_plan(engine, plan, sequences, rank, world, ctx.device, objective, ctx.kernel,
                 structures=objective.structures(sequences))
        engine.step()
        done += 1
    if rank == 0:
        log.info("profiling the model after %d training step(s) of the job", done)
    return done


def job_tokens(data: Any, objective: Any, first_step: int, min_tokens: int) -> list[int]:
    """The token ids of the job's training batches from `first_step` on, concatenated until at least
    `min_tokens` (every rank gets the same: batches derive from (seed, step)). The profiler cuts its
    sequences from them: a model's cost can depend on what it reads (SeqBoat activates tokens by content)."""
    out: list[int] = []
    step = first_step
    while len(out) < min_tokens and step < first_step + 1000:
        for seq in data.train_batch(step):
            out += list(objective.tokens(seq))
        step += 1
    return out


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
    repeats: int = 3,
    data: Any = None,
) -> tuple[list[dict[str, Any]], float, dict[int, float], float]:
    """Median fwd+bwd times: (points beyond the fixed costs, fixed cost of a micro-batch, fixed cost of a group
    by size, fixed cost of a step); see the module docstring (the caller trains the first steps). Sequences
    are cut from the training text of `data` (the job's data module, `job_tokens`), or drawn uniformly from
    the vocabulary without it."""
    world = dist.get_world_size()
    rng = random.Random(0)
    cases = [(d, s) for d in degrees for s in length_grid(min(max_len, tokens_per_rank * d))]
    most = max(max(1, world // d) * s for d, s in cases)  # tokens of the largest case
    text = job_tokens(data, objective, 0, 2 * most) if data is not None else None
    objective = objective.timing_objective()  # what times plain token sequences (CoPG: language modelling)
    if text is not None and len(text) < most:
        raise ValueError(f"the job's training batches hold {len(text)} tokens, fewer than the {most} a profile case "
                         "needs; profile with more data (data.tokens_per_batch, a larger dataset)")
    show = dist.get_rank() == 0
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(cases) + len(degrees) + 1, desc="profiling", unit="case")

    def median_time(plan: Plan, sequences: list[list[int]]) -> float:
        _timed(engine, plan, sequences, world, device, objective, kernel)  # warm-up
        return statistics.median(_timed(engine, plan, sequences, world, device, objective, kernel) for _ in range(repeats))

    # An (almost) idle micro-batch: 2 tokens on rank 0, every other rank idle. The last micro-batch of a
    # plan also reduces the gradients (ZeRO's boundary): every measured case is followed by one of
    # these, and the same plan with two of them is subtracted, so the boundary cancels out.
    idle_mb = MicroBatch((Group(0, 1, (0,)),))
    tiny = [[1, 2]]
    one_idle = median_time(Plan((2,), (idle_mb,)), tiny)
    two_idle = median_time(Plan((2, 2), (idle_mb, MicroBatch((Group(0, 1, (1,)),)))), tiny * 2)
    fixed_s = max(0.0, two_idle - one_idle)
    step_s = max(0.0, one_idle - fixed_s) + _optimizer_step_s(
        engine, lambda: _timed(engine, Plan((2,), (idle_mb,)), tiny, world, device, objective, kernel), repeats)
    if show:
        bar.update()

    def side_by_side(d: int, s: int) -> float:
        """One micro-batch of world // d groups of d ranks, each holding a sequence of s tokens (beyond an
        idle micro-batch)."""
        k = max(1, world // d)
        if text is not None:
            start = rng.randrange(len(text) - k * s + 1)
            seqs = [list(text[start + j * s : start + (j + 1) * s]) for j in range(k)] + tiny
        else:
            seqs = [[rng.randrange(vocab_size) for _ in range(s)] for _ in range(k)] + tiny
        groups = MicroBatch(tuple(Group(j * d, d, (j,)) for j in range(k)))
        plan = Plan(tuple(s for _ in range(k)) + (2,), (groups, MicroBatch((Group(0, 1, (k,)),))))
        return median_time(plan, seqs) - two_idle

    overhead = {}
    for d in degrees:
        overhead[d] = max(0.0, side_by_side(d, 2 * d))
        if show:
            bar.update()
            bar.set_postfix(d=d, overhead_ms=f"{overhead[d] * 1e3:.0f}")
    points = []
    for d, s in cases:
        # A micro-batch costs fixed_s + the group's overhead + its sequences' times: keep only the last here.
        points.append({"degree": d, "tokens": s, "time_s": max(1e-6, side_by_side(d, s) - overhead[d])})
        if show:
            bar.update()
            bar.set_postfix(d=d, s=s, ms=f"{points[-1]['time_s'] * 1e3:.0f}")
    if show:
        bar.close()
    return points, fixed_s, overhead, step_s


def _optimizer_step_s(engine: Any, backward: Any, repeats: int) -> float:
    """Slowest rank's median time of the optimizer step with the step's loss reduction (once per step),
    each after a `backward()` pass as in training."""
    times = []
    for _ in range(repeats + 1):
        backward()
        dist.barrier()
        t0 = time.perf_counter()
        engine.step()
        dist.all_reduce(torch.zeros(3, dtype=torch.float64))
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times[1:])
