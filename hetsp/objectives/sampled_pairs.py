"""Offline CoPG pairs from a fine-tuning dataset: each prompt's real completion (chosen) against a
completion sampled from the starting model (rejected), both scored by the same reward function.

    python -m hetsp.objectives.sampled_pairs CONFIG [--prompts N] [--seed S] [--batch B]

reads from CONFIG: `[model] init_from` (the model to sample from: the starting policy), `[data]`
(a `prompt_completion` dataset; prompts come from its training split, in an order shuffled by
`--seed`, skipping prompts over `objective.max_prompt_tokens` and examples over
`data.max_seq_len` tokens) and `[objective]` (`reward_fn`, `temperature`, `top_p`,
`max_new_tokens`); and writes `--prompts` rows of TRL's pair format with scores,
`prompt`/`chosen`/`rejected`/`score_chosen`/`score_rejected`, to `objective.data`. The samples
come from hetsp's sampler, `hetsp.generation.sampling.sample_in_lockstep`, in one process: `--batch`
prompts at a time (default 16; it bounds the memory of the cache) decode together with the
model's cache, all from one generator seeded by `--seed` (the same seed and batch give the same
rows). A sample that equals the real completion, or an empty one, is drawn again, in one batched
round for all such prompts (up to 4 draws in all, then the prompt is skipped, counted in the log,
and the next usable prompt takes its place), so every row is a pair of two different non-empty
completions.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

DRAWS = 4  # samples drawn for a prompt before it is skipped


def draw_samples(model: Any, prompts: Sequence[Sequence[int]], rejected: Callable[[int, list[int]], bool],
                 section: Any, eos_token_id: int | None, generator: Any, batch: int,
                 log: Any = print) -> list[list[int] | None]:
    """One sample per prompt (token ids, eos removed) with `sample_in_lockstep`, `batch` prompts
    per call in order, all from `generator`. A sample for which `rejected(p, tokens)` holds is
    drawn again for those prompts together, up to `DRAWS` draws in all; after that the prompt's
    entry is None."""
    from hetsp.generation import sampling

    if batch < 1:
        raise ValueError(f"--batch {batch}: must be >= 1")
    out: list[list[int] | None] = [None] * len(prompts)
    todo = list(range(len(prompts)))
    t0 = time.perf_counter()
    for draw in range(DRAWS):
        if not todo:
            break
        for c in range(0, len(todo), batch):
            chunk = todo[c : c + batch]
            samples = sampling.sample_in_lockstep(
                model, [prompts[p] for p in chunk], 1, section.max_new_tokens, generator,
                temperature=section.temperature, top_p=section.top_p, eos_token_id=eos_token_id)
            for p, (s,) in zip(chunk, samples):
                out[p] = [t for t in s if t != eos_token_id]
            log(f"draw {draw + 1}: {min(c + batch, len(todo))}/{len(todo)} prompts sampled "
                f"({time.perf_counter() - t0:.0f} s)", flush=True)
        todo = [p for p in todo if rejected(p, out[p])]  # type: ignore[arg-type]
    for p in todo:
        out[p] = None
    return out


def build_pairs(cfg: Any, num_prompts: int, seed: int, log: Any = print, batch: int = 16) -> list[dict[str, Any]]:
    """`num_prompts` scored rows (real completion, one sample) from `cfg`'s dataset and model."""
    import torch

    from hetsp.data.tokenizer import load_tokenizer
    from hetsp.generate import load_for_generation
    from hetsp.generation.sampling import load_reward_fn, score_completions
    from hetsp.objectives.online import bos_head, finetune_rows

    section = cfg.objective
    if not section.reward_fn:
        raise ValueError("sampled pairs are scored by objective.reward_fn: name it (module:function)")
    if not section.data:
        raise ValueError("objective.data: name the pairs file to write (.jsonl)")
    if batch < 1:
        raise ValueError(f"--batch {batch}: must be >= 1")
    fn = load_reward_fn(section.reward_fn)
    tok = load_tokenizer(cfg.data.tokenizer)
    head = bos_head(cfg, tok)
    model, _ = load_for_generation(cfg.model.init_from)
    rows = finetune_rows(cfg, "sampled pairs take prompts and real completions from")[0]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    gen = torch.Generator().manual_seed(seed)
    out: list[dict[str, Any]] = []
    skipped = 0
    pos = 0
    while len(out) < num_prompts and pos < len(order):
        picked: list[int] = []  # the next usable prompts, as many as rows are missing
        while len(picked) < num_prompts - len(out) and pos < len(order):
            i = order[pos]
            pos += 1
            n_prompt = len(tok.encode(rows[i]["prompt"]))
            if (section.max_prompt_tokens and n_prompt > section.max_prompt_tokens) or \
                    n_prompt + len(tok.encode(rows[i]["completion"])) > cfg.data.max_seq_len:
                continue
            picked.append(i)
        texts: dict[int, str] = {}

        def rejected(p: int, tokens: list[int]) -> bool:
            texts[p] = tok.decode(tokens)
            return not texts[p] or texts[p] == rows[picked[p]]["completion"]

        samples = draw_samples(model, [head + list(tok.encode(rows[i]["prompt"])) for i in picked], rejected,
                               section, tok.eos_token_id, gen, batch, log)
        for p, (i, s) in enumerate(zip(picked, samples)):
            if s is None:
                skipped += 1
                continue
            prompt, real, sample = rows[i]["prompt"], rows[i]["completion"], texts[p]
            chosen, rejected_score = score_completions(fn, section.reward_fn, prompt, [real, sample], f"training row {i}")
            out.append({"prompt": prompt, "chosen": real, "rejected": sample, "score_chosen": chosen,
                        "score_rejected": rejected_score})
        if skipped:
            log(f"{skipped} prompt(s) skipped so far: {DRAWS} samples each were empty or equal to the real completion",
                flush=True)
    if len(out) < num_prompts:
        raise ValueError(f"only {len(out)} usable prompts for {num_prompts} pairs; lower --prompts")
    return out


def main(argv: list[str] | None = None) -> int:
    from hetsp.config import load_config
    from hetsp.loading import resolve_config

    ap = argparse.ArgumentParser(prog="python -m hetsp.objectives.sampled_pairs", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--prompts", type=int, default=64, help="pairs to write (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="prompt order and sampling seed (default 0)")
    ap.add_argument("--batch", type=int, default=16, help="prompts sampled together (default 16)")
    args = ap.parse_args(argv)
    cfg = resolve_config(load_config(args.config))
    rows = build_pairs(cfg, args.prompts, args.seed, batch=args.batch)
    path = Path(cfg.objective.data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    print(f"wrote {len(rows)} pairs to {path}: mean reward real {mean('score_chosen'):.3f}, "
          f"sampled {mean('score_rejected'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
