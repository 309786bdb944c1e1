"""Reference-model log-probabilities for CoPG, computed under hetsp's own plans.

Two sources, the same numbers:

- precomputed: one pass over the training examples before training
  (`precompute_reference`), each batch executed under a plan like any other;
  the per-example sums are cached in the run folder under a key made of the
  model's and the data's fingerprints, and reused on resume;
- live: `live_reference` runs the frozen reference under the step's plan
  (a frozen copy, ZeRO-3 partitioned under ZeRO-3; with a peft LoRA
  model, the policy itself inside `disable_adapter()`, so no second copy).

Either way the statistic is the objective's own (the completion-token
log-prob sum), assembled across ranks and groups by the executor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from hetsp.executor import run_plan
from hetsp.objectives.copg import ScoredCompletion
from hetsp.plan import Plan


def adapters_disabled(model: Any) -> contextlib.AbstractContextManager:
    """The base model's behaviour: peft's `disable_adapter()` when `model` is a peft model
    (the reference of a LoRA run), else nothing to disable."""
    target = getattr(model, "module", model)
    disable = getattr(target, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


def sequence_logps(
    model: Any, plan: Plan, examples: Sequence[ScoredCompletion], rank: int, world_size: int, device: Any,
    objective: Any, kernel: str = "auto",
) -> list[float]:
    """log pi(completion | prompt) of every example under `model`, under `plan` (every rank takes part)."""
    res = run_plan(model, plan, examples, rank, world_size, device, objective, kernel, stats_only=True)
    return [res.seq_stats[i][0] for i in range(len(examples))]


def reference_logps(
    model: Any, plan: Plan, examples: Sequence[ScoredCompletion], rank: int, world_size: int, device: Any,
    objective: Any, kernel: str = "auto",
) -> list[float]:
    """log pi_ref(completion | prompt) of every example, under `plan` (every rank takes part)."""
    with adapters_disabled(model):
        return sequence_logps(model, plan, examples, rank, world_size, device, objective, kernel)


def with_reference(examples: Sequence[ScoredCompletion], logps: Sequence[float]) -> list[ScoredCompletion]:
    return [dataclasses.replace(ex, ref_logp=float(lp)) for ex, lp in zip(examples, logps)]


def live_reference(model: Any, plan: Plan, examples, rank, world_size, device, objective, kernel="auto"):
    """The examples with their reference log-probs from the frozen `model`, under the step's plan."""
    return with_reference(examples, reference_logps(model, plan, examples, rank, world_size, device, objective, kernel))


def model_fingerprint(model: Any) -> str:
    """Names, shapes and fp64 sums of every parameter (gathered under ZeRO-3): equal models,
    equal fingerprints; any trained change alters it."""
    h = hashlib.sha256()
    target = getattr(model, "module", model)
    for name, p in target.named_parameters():
        gather = contextlib.nullcontext()
        if hasattr(p, "ds_id"):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p])
        with gather:
            t = p.detach().to(torch.float64)
            h.update(f"{name}:{tuple(t.shape)}:{t.sum().item():.17g}:{t.abs().sum().item():.17g};".encode())
    return h.hexdigest()[:16]


def data_fingerprint(examples: Sequence[ScoredCompletion]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.prompt_len}:{','.join(map(str, ex.tokens))};".encode())
    return h.hexdigest()[:16]


def precompute_reference(
    model: Any,
    examples: Sequence[ScoredCompletion],
    batches: Sequence[Sequence[int]],
    plan_for: Callable[[list[ScoredCompletion]], Plan],
    run_dir: str | Path,
    rank: int,
    world_size: int,
    device: Any,
    objective: Any,
    kernel: str = "auto",
) -> tuple[list[ScoredCompletion], bool]:
    """All `examples` with reference log-probs, and whether they came from the cache.

    `batches` are lists of example indices (whole bundles), each executed under
    `plan_for(batch examples)` (which must give every rank the same plan). The result
    is cached in ``run_dir/reference/<model>-<data>.json`` and reused when the key matches.
    """
    key = f"{model_fingerprint(model)}-{data_fingerprint(examples)}"
    path = Path(run_dir) / "reference" / f"{key}.json"
    cached = json.loads(path.read_text())["logps"] if path.is_file() else None
    # every rank must agree, or some would skip the collectives of the pass
    if _all_ranks(cached is not None and len(cached) == len(examples)):
        return with_reference(examples, cached), True
    logps: list[float | None] = [None] * len(examples)
    for idx in batches:
        batch = [examples[i] for i in idx]
        for i, lp in zip(idx, reference_logps(model, plan_for(batch), batch, rank, world_size, device, objective, kernel)):
            logps[i] = lp
    missing = [i for i, lp in enumerate(logps) if lp is None]
    if missing:
        raise ValueError(f"precompute_reference: {len(missing)} example(s) are in no batch (first: {missing[0]})")
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": key.split("-")[0], "data": key.split("-")[1], "logps": logps}))
        tmp.replace(path)
    _all_ranks(True)  # a barrier: the cache exists for every rank after this call
    return with_reference(examples, logps), False


def _all_ranks(flag: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
