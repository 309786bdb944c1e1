"""Reward spread within CoPG bundles: Diverse Beam Search against sampling.

    PYTHONPATH=. python bench/diverse_beam_spread.py [--model runs/sft_stdlib_export] [--prompts 16] [--k 4]
        [--new-tokens 24] [--diversity 0.5] [--temperature 1.0] [--top-p 1.0]

For each prompt (a function header and docstring, byte tokens), k completions come from
sampling and from Diverse Beam Search (G = B = k, Hamming diversity lambda); each is scored by
the embedded function-body reward. Prints the mean within-bundle spread (max - min reward),
standard deviation and mean reward for both. With `--model` (an exported model folder, e.g.
the fine-tuned `runs/sft_stdlib_export`) the prompts are the function-body task's held-out
prompts (`bench/generation.py`'s `held_out_texts`); without it, a small random-initialised
Llama over bytes on functions of `textwrap` and `json.decoder` (no checkpoint is downloaded),
which measures the decoders' spread on one fixed model, not a trained one. Completions stop at
the tokenizer's eos.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import statistics
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hetsp.attention import register_attention  # noqa: E402
from hetsp.config import ModelConfig  # noqa: E402
from hetsp.data.tokenizer import ByteTokenizer  # noqa: E402
from hetsp.generation.diverse_beam import diverse_beam_search  # noqa: E402
from hetsp.generation.sampling import sample_in_lockstep  # noqa: E402
from hetsp.model_registry import build_model  # noqa: E402
from hetsp.rewards.funcbody import funcbody_reward  # noqa: E402


def prompts(n: int) -> list[str]:
    out = []
    src = inspect.getsource(textwrap) + inspect.getsource(json.decoder)
    lines = src.splitlines(keepends=True)
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
            out.append(textwrap.dedent("".join(lines[node.lineno - 1 : node.body[0].end_lineno])))
    return (out * n)[:n]


def spread(rewards: list[float]) -> tuple[float, float]:
    return max(rewards) - min(rewards), statistics.pstdev(rewards)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--diversity", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--model", default="", help="exported model folder (held-out task prompts); empty: random tiny Llama")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    args = p.parse_args()
    torch.manual_seed(0)
    tok = ByteTokenizer()
    if args.model:
        from bench.generation import _model, held_out_texts

        model = _model(args.model)
        texts = [t for t in held_out_texts() if len(tok.encode(t)) <= args.max_prompt_tokens][: args.prompts]
    else:
        cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
        model = build_model(cfg, tok.vocab_size, attn_implementation=register_attention()).eval()
        texts = prompts(args.prompts)
    gen = torch.Generator().manual_seed(0)
    eos = tok.eos_token_id
    rows = {"sampling": [], "diverse_beam": []}
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        sampled = sample_in_lockstep(model, [ids], args.k, args.new_tokens, gen, temperature=args.temperature,
                                     top_p=args.top_p, eos_token_id=eos)[0]
        beams = diverse_beam_search(model, ids, args.k, args.k, args.diversity, args.new_tokens, eos_token_id=eos)
        dbs = [g[0].tokens for g in beams]
        for name, comps in (("sampling", sampled), ("diverse_beam", dbs)):
            rewards = [funcbody_reward(text, tok.decode([t for t in c if t != eos])) for c in comps]
            rows[name].append((*spread(rewards), statistics.mean(rewards)))
        print(f"prompt {i + 1}/{len(texts)} done", file=sys.stderr, flush=True)
    print(f"| decoder | mean spread (max - min) | mean std | mean reward | bundles of {args.k} |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {statistics.mean(x[0] for x in r):.4f} | {statistics.mean(x[1] for x in r):.4f} | "
              f"{statistics.mean(x[2] for x in r):.4f} | {len(r)} |")


if __name__ == "__main__":
    main()
