"""Offline CoPG pairs from a fine-tuning dataset: each prompt's real completion (chosen) against a
completion sampled from the starting model (rejected), both scored by the same reward function.

    python -m hetsp.objectives.sampled_pairs CONFIG [--prompts N] [--seed S]

reads from CONFIG: `[model] init_from` (the model to sample from: the starting policy), `[data]`
(a `prompt_completion` dataset; prompts come from its training split, in an order shuffled by
`--seed`, skipping prompts over `objective.max_prompt_tokens` and examples over
`data.max_seq_len` tokens) and `[objective]` (`reward_fn`, `temperature`, `top_p`,
`max_new_tokens`); and writes `--prompts` rows of TRL's pair format with scores,
`prompt`/`chosen`/`rejected`/`score_chosen`/`score_rejected`, to `objective.data`. The samples
come from transformers' `generate` with the model's cache in one process (`hetsp.generate`):
the same distribution as hetsp's sampler, faster than its cache-free lockstep decoding. A
sample that equals the real completion, or an empty one, is drawn again (up to 4 times, then
the prompt is skipped), so every row is a pair of two different non-empty completions.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any


def build_pairs(cfg: Any, num_prompts: int, seed: int, log: Any = print) -> list[dict[str, Any]]:
    """`num_prompts` scored rows (real completion, one sample) from `cfg`'s dataset and model."""
    from hetsp.data.tokenizer import load_tokenizer
    from hetsp.generate import generate, load_for_generation
    from hetsp.generation.sampling import load_reward_fn, score_completions
    from hetsp.objectives.online import finetune_rows

    section = cfg.objective
    if not section.reward_fn:
        raise ValueError("sampled pairs are scored by objective.reward_fn: name it (module:function)")
    if not section.data:
        raise ValueError("objective.data: name the pairs file to write (.jsonl)")
    fn = load_reward_fn(section.reward_fn)
    tok = load_tokenizer(cfg.data.tokenizer)
    model, _ = load_for_generation(cfg.model.init_from)
    rows = finetune_rows(cfg, "sampled pairs take prompts and real completions from")[0]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i in order:
        if len(out) == num_prompts:
            break
        prompt, real = rows[i]["prompt"], rows[i]["completion"]
        n_prompt = len(tok.encode(prompt))
        if (section.max_prompt_tokens and n_prompt > section.max_prompt_tokens) or \
                n_prompt + len(tok.encode(real)) > cfg.data.max_seq_len:
            continue
        for attempt in range(4):
            sample = generate(model, tok, prompt, section.max_new_tokens, section.temperature,
                              seed=seed * 1_000_003 + i * 4 + attempt, top_p=section.top_p)
            if sample and sample != real:
                break
        else:
            continue
        chosen, rejected = score_completions(fn, section.reward_fn, prompt, [real, sample], f"training row {i}")
        out.append({"prompt": prompt, "chosen": real, "rejected": sample, "score_chosen": chosen,
                    "score_rejected": rejected})
        if len(out) % 8 == 0:
            log(f"{len(out)}/{num_prompts} pairs ({time.perf_counter() - t0:.0f} s)", flush=True)
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
    args = ap.parse_args(argv)
    cfg = resolve_config(load_config(args.config))
    rows = build_pairs(cfg, args.prompts, args.seed)
    path = Path(cfg.objective.data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    print(f"wrote {len(rows)} pairs to {path}: mean reward real {mean('score_chosen'):.3f}, "
          f"sampled {mean('score_rejected'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
