"""Reward spread within CoPG bundles: Diverse Beam Search against sampling.

    python bench/diverse_beam_spread.py [--prompts 16] [--k 4] [--new-tokens 24] [--diversity 0.5]

For each prompt (a standard-library function header and docstring, byte
tokens), k completions come from sampling (temperature 1, top-p 1) and from
Diverse Beam Search (G = B = k, Hamming diversity lambda); each is scored by
the embedded function-body reward. Prints the mean within-bundle spread
(max - min reward) and standard deviation for both. The model is a small
random-initialised Llama over bytes (no checkpoint is downloaded), so the
figure measures the decoders' spread on one fixed model, not a trained one.
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
    args = p.parse_args()
    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    model = build_model(cfg, tok.vocab_size, attn_implementation=register_attention()).eval()
    gen = torch.Generator().manual_seed(0)
    rows = {"sampling": [], "diverse_beam": []}
    for text in prompts(args.prompts):
        ids = tok.encode(text)
        sampled = sample_in_lockstep(model, [ids], args.k, args.new_tokens, gen)[0]
        beams = diverse_beam_search(model, ids, args.k, args.k, args.diversity, args.new_tokens)
        dbs = [g[0].tokens for g in beams]
        for name, comps in (("sampling", sampled), ("diverse_beam", dbs)):
            rows[name].append(spread([funcbody_reward(text, tok.decode(c)) for c in comps]))
    for name, r in rows.items():
        print(f"{name:>12}: mean spread (max-min) {statistics.mean(x[0] for x in r):.4f}, "
              f"mean std {statistics.mean(x[1] for x in r):.4f} over {len(r)} bundles of {args.k}")


if __name__ == "__main__":
    main()
