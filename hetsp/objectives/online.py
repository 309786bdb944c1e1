"""Online CoPG: every `objective.online_every` steps, k completions per prompt sampled from the
current policy and scored by `objective.reward_fn`, then trained on for the next steps.

A sampling round covers `online_every * bundles_per_batch` prompts (taken in turn from the
prompt file, reshuffled every pass from the run seed); rank r samples prompts r, r + world, ...
of the round with `hetsp.generation.sampling.sample_in_lockstep`, or with Diverse Beam Search
(`hetsp.generation.diverse_beam.diverse_beam_in_lockstep`; every rank stays in the model's
collectives until all have finished), scores its own completions, and the scored
completions are gathered on every rank. Step s trains on bundles
`(s mod online_every) * bundles_per_batch ...` of its round. Reference log-probs are live
(a frozen copy, or the LoRA base): precomputed ones cannot cover samples that do not exist yet.
A resumed run samples its current round again from the restored policy.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from hetsp.objectives.copg import ScoredCompletion


class OnlinePrompts:
    """The prompts of online CoPG: the slice of `DataModule`'s interface the training loop uses
    (batches come from sampling, `CoPG.train_batch`)."""

    def __init__(self, prompts: list[list[int]], texts: list[str], per_round: int, seed: int, tokenizer: Any) -> None:
        if not prompts:
            raise ValueError("online CoPG: the prompt file has no usable prompt")
        self.prompts, self.texts = prompts, texts
        self.per_round = per_round
        self.seed = seed
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.stats = {"prompts": len(prompts), "prompts_per_round": per_round}

    def round_prompts(self, rnd: int) -> list[int]:
        """Prompt indices of sampling round `rnd` (consecutive, reshuffled every pass)."""
        out = []
        n = len(self.prompts)
        for j in range(rnd * self.per_round, (rnd + 1) * self.per_round):
            epoch, k = divmod(j, n)
            order = list(range(n))
            random.Random(f"{self.seed}:prompts:{epoch}").shuffle(order)
            out.append(order[k])
        return out

    def epoch_of(self, step: int) -> int:
        return 0

    def val_batches(self, num: int) -> list:
        return []


def online_prompts(cfg: Any, section: Any, seed: int) -> OnlinePrompts:
    """Prompts tokenized with `data.tokenizer` and limited by `objective.max_prompt_tokens` like
    offline prompts: the `prompt` field of every row of `objective.data`, or, without it, the
    training prompts of the `[data]` fine-tuning dataset (e.g. `funcbody`), encoded as
    fine-tuning encodes them (bos first when `data.add_bos`)."""
    from hetsp.data.preference import read_rows
    from hetsp.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    if section.data:
        rows, head = read_rows(section.data), []
    else:
        rows, head = finetune_rows(cfg, "online CoPG needs prompts: objective.data (rows with a 'prompt' field) or")[0], \
            bos_head(cfg, tok)
    prompts, texts = encode_prompts(rows, tok, head, section)
    return OnlinePrompts(prompts, texts, section.online_every * section.bundles_per_batch, seed, tok)


def finetune_rows(cfg: Any, need: str) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows) of the `[data]` fine-tuning dataset; `need` starts the error."""
    if cfg.data.format != "prompt_completion":
        raise ValueError(f"{need} a [data] fine-tuning dataset with data.format = 'prompt_completion'")
    from hetsp.data.finetune import load_examples

    return load_examples(cfg.data)


def bos_head(cfg: Any, tok: Any) -> list[int]:
    """What fine-tuning puts before a prompt: the bos token when `data.add_bos`."""
    return [tok.bos_token_id] if cfg.data.add_bos else []


def encode_prompts(rows: Sequence[dict], tok: Any, head: list[int], section: Any) -> tuple[list[list[int]], list[str]]:
    """Token ids and texts of the rows' `prompt` fields, limited by `max_prompt_tokens`."""
    from hetsp.data.preference import _text

    prompts, texts = [], []
    for k, row in enumerate(rows):
        text = _text(row, "prompt", k)
        ids = head + list(tok.encode(text))
        if not ids:
            raise ValueError(f"preference row {k}: the prompt has no tokens")
        limit = section.max_prompt_tokens
        if limit and len(ids) > limit:
            if section.long_prompt == "drop":
                continue
            ids = ids[-limit:]
        prompts.append(ids)
        texts.append(text)
    return prompts, texts


def heldout_prompts(cfg: Any, section: Any) -> tuple[list[list[int]], list[str]]:
    """The first `objective.eval_prompts` validation prompts of the `[data]` fine-tuning dataset
    (files the training prompts do not come from), encoded like online prompts."""
    from hetsp.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    rows = finetune_rows(cfg, "objective.eval_prompts samples held-out prompts: it needs")[1]
    prompts, texts = encode_prompts(rows, tok, bos_head(cfg, tok), section)
    if len(prompts) < section.eval_prompts:
        raise ValueError(f"objective.eval_prompts = {section.eval_prompts}, but the validation split has "
                         f"{len(prompts)} usable prompt(s); lower it or raise data.validation_fraction")
    return prompts[: section.eval_prompts], texts[: section.eval_prompts]


def diverse_beam_completions(model: Any, prompts: Sequence[Sequence[int]], k: int, diversity: float,
                             max_new_tokens: int, eos_token_id: int | None, device: Any, kernel: str) -> list[list[list[int]]]:
    """k completions of each of this rank's prompts by Diverse Beam Search (k groups of one beam;
    each group's best beam). Every rank must call it: `diverse_beam_in_lockstep` keeps the ranks'
    forward counts equal (ZeRO-3 gathers parameters inside each forward); each prompt's beams
    are those of `diverse_beam_search` on it alone."""
    from hetsp.generation.diverse_beam import diverse_beam_in_lockstep

    return [[g[0].tokens for g in groups]
            for groups in diverse_beam_in_lockstep(model, prompts, k, k, diversity, max_new_tokens, eos_token_id,
                                                   device, kernel)]


def sample_scored(objective: Any, ctx: Any, prompts: Sequence[Sequence[int]], texts: Sequence[str], seed: Any,
                  names: Sequence[Any] | None = None, decoding: str = "sample") -> list[ScoredCompletion]:
    """`samples_per_prompt` completions of each prompt from the current policy (`decoding`:
    "sample" or "diverse_beam"), scored by `reward_fn`, the same list on every rank (bundle id =
    position of the prompt). Rank r takes prompts r, r + world, ...; `names[b]` names prompt b in
    errors (default its position)."""
    import torch
    import torch.distributed as dist

    from hetsp.generation.sampling import load_reward_fn, sample_in_lockstep, score_completions

    cfg, tok = objective.cfg, ctx.data.tokenizer
    mine = list(range(ctx.rank, len(prompts), ctx.world_size))
    gen = torch.Generator().manual_seed(random.Random(f"{seed}:{ctx.rank}").getrandbits(63))
    model = ctx.engine.module
    was_training = model.training
    model.eval()
    try:
        if decoding == "diverse_beam":
            comps = diverse_beam_completions(model, [prompts[b] for b in mine], cfg.samples_per_prompt, cfg.diversity,
                                             cfg.max_new_tokens, tok.eos_token_id, ctx.device, ctx.kernel)
        else:
            comps = sample_in_lockstep(model, [prompts[b] for b in mine], cfg.samples_per_prompt,
                                       cfg.max_new_tokens, gen, ctx.rank, ctx.device, cfg.temperature, cfg.top_p,
                                       tok.eos_token_id, ctx.kernel)
    finally:
        model.train(was_training)
    fn = load_reward_fn(cfg.reward_fn)
    scored = []
    for b, cs in zip(mine, comps):
        decoded = [tok.decode([t for t in c if t != tok.eos_token_id]) for c in cs]
        rewards = score_completions(fn, cfg.reward_fn, texts[b], decoded, f"prompt {names[b] if names else b}")
        scored += [ScoredCompletion(tuple(list(prompts[b]) + c), len(prompts[b]), r, b) for c, r in zip(cs, rewards)]
    parts: list[Any] = [None] * ctx.world_size
    if dist.is_available() and dist.is_initialized() and ctx.world_size > 1:
        dist.all_gather_object(parts, scored)
    else:
        parts = [scored]
    return sorted((e for part in parts for e in part), key=lambda e: e.bundle)


def sample_round(objective: Any, ctx: Any, rnd: int) -> list[ScoredCompletion]:
    """The scored completions of round `rnd`, the same list on every rank (bundle id = position
    of the prompt in the round)."""
    data = ctx.data
    chosen = data.round_prompts(rnd)
    return sample_scored(objective, ctx, [data.prompts[p] for p in chosen], [data.texts[p] for p in chosen],
                         (data.seed, rnd), names=chosen, decoding=objective.cfg.decoding)


def heldout_metrics(objective: Any, ctx: Any, prompts: Sequence[Sequence[int]], texts: Sequence[str],
                    reference: Any | None) -> dict[str, float]:
    """Completions of the held-out prompts sampled from the current policy (the same random
    stream at every evaluation): their mean reward, and, given the frozen `reference`, the KL
    estimate mean(log pi(y|x) - log pi_ref(y|x)) over them (y sampled from pi; sums over
    completion tokens, both under one hetsp plan)."""
    from hetsp.objectives.reference import reference_logps, sequence_logps

    scored = sample_scored(objective, ctx, prompts, texts, ("heldout", ctx.data.seed))
    out = {"heldout_reward": sum(e.reward for e in scored) / len(scored), "heldout_completions": float(len(scored))}
    if reference is not None:
        plan = ctx.planning.plan_for(-1, sequences=scored, bundles=objective.bundles(scored))
        kept = ctx.planning.kept(plan, scored)
        args = (plan, kept, ctx.rank, ctx.world_size, ctx.device, objective, ctx.kernel)
        model = ctx.engine.module
        was_training = model.training
        model.eval()
        try:
            logp = sequence_logps(model, *args)
        finally:
            model.train(was_training)
        ref = reference_logps(reference, *args)
        out["heldout_kl"] = sum(a - b for a, b in zip(logp, ref)) / len(kept)
    return out


def step_examples(examples: Sequence[ScoredCompletion], step: int, online_every: int, per_batch: int) -> list[ScoredCompletion]:
    """The completions step `step` trains on: its `per_batch` bundles of the round."""
    lo = (step % online_every) * per_batch
    return [e for e in examples if lo <= e.bundle < lo + per_batch]
