"""Model-generated trajectories for SequenceMatch's mixture term, sampled inside a distributed run.

Each rank samples its own prompts from the current policy over the vocabulary plus `<bkspc>`
(a `<bkspc>` pops the last generated token, never a prompt token) and keeps calling the model
until every rank has finished (the lockstep rule of `hetsp.generation.sampling`: under ZeRO-3
every forward gathers parameters with a collective).

The logits for the next action are the model's output on the current context as a plain
sequence (hetsp/backspace.py): the stack after a pushed token, the stack followed by the
`<bkspc>` itself after a pop. That is exactly the output at that position of the trajectory's
stack-structured forward in training. The training model's attention is ring attention, which
needs a shard context on every call, so the cached `models.backspace_decoding.BackspaceDecoder`
(plain calls with a cache, one hybrid model) cannot run it; the contexts are recomputed with
packed forwards through hetsp's layout (`packed_last_logits`), like online CoPG's sampling.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from hetsp.generation.sampling import _any_rank, packed_last_logits, sample_next


@torch.no_grad()
def sample_backspace_in_lockstep(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    generator: torch.Generator,
    bkspc_id: int,
    eos_token_id: int,
    rank: int = 0,
    device: Any = "cpu",
    kernel: str = "auto",
    temperature: float = 1.0,
    placeholder_token: int = 0,
) -> list[list[int]]:
    """The actions (pushed tokens and `<bkspc>` pops, EOS included when sampled) of one trajectory per
    prompt of this rank, at most `max_new_tokens` each. Every rank of the world must call it (with its
    own prompts, possibly none); all of a rank's live trajectories share one packed forward per round."""
    if max_new_tokens < 1 or not temperature > 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1 and temperature ({temperature}) > 0")
    if any(len(p) == 0 or bkspc_id in p for p in prompts):
        raise ValueError("every prompt needs at least one token and no <bkspc>")
    actions: list[list[int]] = [[] for _ in prompts]
    stacks = [list(p) for p in prompts]
    popped = [False] * len(prompts)  # the last action was a pop: the context ends with the <bkspc>

    def live(i: int) -> bool:
        return len(actions[i]) < max_new_tokens and not (actions[i] and actions[i][-1] == eos_token_id)

    while _any_rank(any(live(i) for i in range(len(prompts))), device):
        idx = [i for i in range(len(prompts)) if live(i)]
        if not idx:
            packed_last_logits(model, [[placeholder_token]], rank, device, kernel)  # keep the collectives in step
            continue
        contexts = [stacks[i] + [bkspc_id] * popped[i] for i in idx]
        logits = packed_last_logits(model, contexts, rank, device, kernel).to(torch.float64)
        for row, i in enumerate(idx):
            if len(stacks[i]) <= len(prompts[i]):  # only prompt tokens left: no pop
                logits[row, bkspc_id] = float("-inf")
        for i, tok in zip(idx, sample_next(logits, temperature, 1.0, generator).tolist()):
            actions[i].append(int(tok))
            popped[i] = tok == bkspc_id
            if popped[i]:
                stacks[i].pop()
            else:
                stacks[i].append(int(tok))
    return actions


def sample_round(objective: Any, ctx: Any, step: int, batch: Sequence[Any]) -> list:
    """The model-generated trajectories of step `step`, the same list on every rank.

    Prompts: the first `sample_prompt_tokens` tokens (the prompt, for a prompt/completion example)
    of `samples_per_round` training sequences of the step's batch, chosen from (seed, step); rank r
    samples trajectories r, r + world, ...; the results are gathered on every rank."""
    import torch.distributed as dist

    from hetsp.objectives.sequencematch import Trajectory

    cfg = objective.config
    rng = random.Random(f"{ctx.data.seed}:sm-samples:{step}")
    prompts = []
    bk = objective.bkspc_token_id
    candidates = [s for s in batch if len(_prompt_of(s, cfg.sample_prompt_tokens, bk)) > 0]
    if not candidates:
        raise ValueError(f"step {step}: no training sequence gives a prompt to sample from")
    for _ in range(cfg.samples_per_round):
        prompts.append(_prompt_of(rng.choice(candidates), cfg.sample_prompt_tokens, bk))
    mine = list(range(ctx.rank, len(prompts), ctx.world_size))
    gen = torch.Generator().manual_seed(hash((ctx.data.seed, step, ctx.rank)) % (2**63))
    model = ctx.engine.module
    was_training = model.training
    model.eval()
    try:
        acts = sample_backspace_in_lockstep(model, [prompts[k] for k in mine], cfg.sample_max_new_tokens, gen,
                                            objective.bkspc_token_id, objective.eos_token_id, ctx.rank, ctx.device,
                                            ctx.kernel, cfg.sample_temperature)
    finally:
        model.train(was_training)
    local = [(k, prompts[k] + a) for k, a in zip(mine, acts)]
    parts: list[Any] = [None] * ctx.world_size
    if dist.is_available() and dist.is_initialized() and ctx.world_size > 1:
        dist.all_gather_object(parts, local)
    else:
        parts = [local]
    out = sorted((e for part in parts for e in part), key=lambda e: e[0])
    return [Trajectory(ids, prompt_length=len(prompts[k]), source="model") for k, ids in out]


def _prompt_of(seq: Sequence[int], max_tokens: int, bkspc_id: int) -> list[int]:
    """A sampling prompt from a training sequence: its prompt (prompt/completion data) or its first
    `max_tokens` tokens, never the whole sequence. The sequence is read with its pops applied (the
    text that remains), so injected noise is left out."""
    stack: list[int] = []
    for t in seq:
        if t == bkspc_id:
            stack.pop()
        else:
            stack.append(int(t))
    n = getattr(seq, "prompt_length", 0) or max_tokens
    return stack[:min(n, len(stack) - 1)]
