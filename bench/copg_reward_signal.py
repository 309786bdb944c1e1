"""How much CoPG can learn from a reward on a model: the reward's variance within bundles (prints a table; not a test).

    PYTHONPATH=. python bench/copg_reward_signal.py [--models runs/default_export runs/sft_stdlib_export]
        [--prompts 32] [--k 4] [--new-tokens 96] [--temperature 0.8] [--top-p 0.95] [--out FILE]

CoPG learns only from reward differences between the completions of one prompt (a bundle): the
pair loss depends on R(y) - R(y'), so whatever a prompt fixes cancels. For each model, k
completions of each of the first `--prompts` held-out function-body prompts (at most 256 byte
tokens, as `configs/copg_stdlib.toml` keeps them) are sampled as the online rounds sample them,
scored by `hetsp.rewards.funcbody`, and the table gives, for the reward and each of its weighted
parts, the mean and the mean within-bundle variance (population variance over the k samples of a
prompt, averaged over prompts), plus how many completions stopped at eos. A part with no
within-bundle variance gives CoPG no signal on this model, however many steps it runs; the
expected reward gain at the KL-regularised optimum is about (within-bundle variance) / beta for
small gains.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.report import emit  # noqa: E402
from bench.generation import _model, held_out_prompts  # noqa: E402
from hetsp.data.tokenizer import ByteTokenizer  # noqa: E402
from hetsp.generation.sampling import sample_in_lockstep  # noqa: E402
from hetsp.rewards.funcbody import WEIGHTS, reward_parts  # noqa: E402


def bundle_stats(rows: list[list[dict[str, float]]]) -> dict[str, tuple[float, float]]:
    """{name: (mean, mean within-bundle variance)} for 'reward' and each weighted part; rows: per
    prompt, the parts of each of its completions."""
    out = {}
    for name in ("reward", *WEIGHTS):
        def value(parts: dict[str, float]) -> float:
            if name == "reward":
                return sum(WEIGHTS[k] * v for k, v in parts.items())
            return WEIGHTS[name] * parts[name]

        per_bundle = [[value(p) for p in bundle] for bundle in rows]
        out[name] = (statistics.mean(v for b in per_bundle for v in b),
                     statistics.mean(statistics.pvariance(b) for b in per_bundle))
    return out


def measure(folder: str, args: argparse.Namespace) -> tuple[dict[str, tuple[float, float]], float]:
    tok = ByteTokenizer()
    model = _model(folder)
    prompts = held_out_prompts(args.prompts, max_tokens=256)
    gen = torch.Generator().manual_seed(args.seed)
    completions = sample_in_lockstep(model, prompts, args.k, args.new_tokens, gen, temperature=args.temperature,
                                     top_p=args.top_p, eos_token_id=tok.eos_token_id)
    rows, stopped = [], 0
    for prompt, bundle in zip(prompts, completions):
        text = tok.decode(prompt)
        parts = []
        for c in bundle:
            stopped += tok.eos_token_id in c
            parts.append(reward_parts(text, tok.decode([t for t in c if t != tok.eos_token_id])))
        rows.append(parts)
    return bundle_stats(rows), stopped / (len(prompts) * args.k)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["runs/default_export", "runs/sft_stdlib_export"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the table to this file")
    args = p.parse_args()
    if args.k < 2:
        raise SystemExit("--k must be at least 2: a bundle of one has no within-bundle variance")
    lines = [f"{args.prompts} held-out prompts x {args.k} completions, {args.new_tokens} new tokens, temperature "
             f"{args.temperature}, top-p {args.top_p}, seed {args.seed}", "",
             "| model | quantity | mean | within-bundle variance |", "|---|---|---|---|"]
    for folder in args.models:
        stats, stopped = measure(folder, args)
        for name, (mean, var) in stats.items():
            label = name if name == "reward" else f"{WEIGHTS[name]} x {name}"
            lines.append(f"| {folder} | {label} | {mean:.4f} | {var:.5f} |")
        lines.append(f"| {folder} | stopped at eos | {stopped:.3f} | |")
        print(f"{folder} done", file=sys.stderr, flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
