"""Sampling k completions per prompt from the policy, on every rank at once, and scoring them.

Each rank samples for its own prompts. Under ZeRO-3 every forward gathers
parameters with a collective, so a rank that has finished must keep calling
the model until every rank has: `sample_in_lockstep` runs one forward per
round on every rank (a one-token dummy when a rank has nothing left) and
stops only when an all-reduce says no rank has work.

Decoding uses the model's cache (`hetsp.generation.decoding`): the prompts run once, then one
token per row per step; families without an exact cache recompute packed full forwards.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Sequence

import torch


def packed_last_logits(
    model: Any, seqs: list[list[int]], rank: int, device: Any, kernel: str, local: bool = False
) -> torch.Tensor:
    """Logits at the last token of each sequence, (n, V), from one packed forward on this rank
    alone (a group of one; `local`: outside any process group)."""
    from hetsp.attention import make_shard_context

    lengths = [len(s) for s in seqs]
    if local:
        shard = _local_shard(lengths, device, kernel)
    else:
        shard = make_shard_context(lengths, rank, 1, rank, device, kernel=kernel)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)[None]
    out = model(input_ids=ids, position_ids=shard.positions[None], hetsp_shard=shard)
    logits = (out.logits if hasattr(out, "logits") else out[0])[0]
    ends = torch.tensor(lengths, device=logits.device).cumsum(0) - 1
    return logits[ends]


def _local_shard(lengths: list[int], device: Any, kernel: str) -> Any:
    """A group-of-one shard context whatever process group exists (rank 0 of a world of one)."""
    import torch.distributed as dist

    from hetsp.attention import make_shard_context

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return make_shard_context(lengths, rank, 1, rank, device, kernel=kernel)
    return make_shard_context(lengths, 0, 1, 0, device, kernel=kernel)


def sample_next(logits_NV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row: temperature, then nucleus (top-p) sampling. (N,) int64."""
    probs = torch.softmax(logits_NV.to(torch.float64) / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _any_rank(flag: bool, device: Any) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def sample_in_lockstep(
    model: Any,
    prompts: Sequence[Sequence[int]],
    k: int,
    max_new_tokens: int,
    generator: torch.Generator,
    rank: int = 0,
    device: Any = "cpu",
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    kernel: str = "auto",
    placeholder_token: int = 0,
    use_cache: bool = True,
) -> list[list[list[int]]]:
    """k sampled completions (token lists, eos included when emitted) for each of this rank's
    `prompts`. Every rank of the world must call it (with its own prompts, possibly none).

    All k * len(prompts) rows advance together, one token per row per step; a row leaves when it
    emits eos or reaches `max_new_tokens`. Each step draws the live rows' tokens with one call on
    `generator` (row order), so the cached and the full-forward decoder (`use_cache=False`, or a
    model family without an exact cache: `decoding.make_decoder`) draw the same tokens."""
    from hetsp.generation.decoding import make_decoder

    if k < 1 or max_new_tokens < 1:
        raise ValueError(f"k ({k}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature}, {top_p}")
    rows = [list(p) for p in prompts for _ in range(k)]  # row p * k + j: sample j of prompt p
    out: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))
    with make_decoder(model, device, kernel, rank, use_cache=use_cache) as dec:
        # Exactly one forward per rank before the loop and one per round, so that ZeRO-3's
        # parameter gathers stay matched across ranks until the all-reduce says all are done.
        if rows:
            logits = dec.start(rows)
        else:
            dec.idle(placeholder_token)
        while _any_rank(bool(live), device):
            if not live:
                dec.idle(placeholder_token)
                continue
            tokens = sample_next(logits, temperature, top_p, generator).tolist()
            keep = []
            for i, (j, tok) in enumerate(zip(live, tokens)):
                out[j].append(int(tok))
                if len(out[j]) < max_new_tokens and not (eos_token_id is not None and tok == eos_token_id):
                    keep.append(i)
            live = [live[i] for i in keep]
            if live:
                logits = dec.advance(keep, [tokens[i] for i in keep])
            else:
                dec.idle(placeholder_token)
    return [out[p * k : (p + 1) * k] for p in range(len(prompts))]


def load_reward_fn(spec: str) -> Callable[..., Any]:
    """The function named ``module:function`` (imported now, so a typo fails before training)."""
    if spec.count(":") != 1:
        raise ValueError(f"reward function {spec!r}: expected 'module:function'")
    mod_name, fn_name = spec.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


def score_completions(fn: Callable[..., Any], spec: str, prompt: str, completions: Sequence[str], where: str) -> list[float]:
    """`fn(prompt, completion)` for each completion; an exception, a non-number or a non-finite
    value is an error naming the function and the example."""
    out = []
    for j, c in enumerate(completions):
        try:
            r = fn(prompt, c)
        except Exception as e:
            raise ValueError(f"reward function {spec} raised {type(e).__name__}: {e} on {where}, completion {j}") from e
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"reward function {spec} returned {r!r} (not a finite number) on {where}, completion {j}")
        out.append(float(r))
    return out
