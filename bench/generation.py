"""Time of one online-CoPG sampling round: cached decoding against full forwards (prints a table; not a test).

    PYTHONPATH=. python bench/generation.py [--model runs/sft_stdlib_export] [--ranks 4] [--prompts-per-rank 2]
        [--k 4] [--new-tokens 160] [--modes full cached] [--out bench/results/generation.md]

A round as `configs/copg_stdlib.toml` runs it: every simulated rank (gloo, one thread each)
samples k completions (temperature 0.8, top-p 0.95, no eos stop so every row runs all
`--new-tokens` steps) for its own held-out function-body prompts with
`hetsp.generation.sampling.sample_in_lockstep`, the model prepared as training prepares it (hetsp's
ring attention, sequence-parallel SSM functions). 'full' recomputes every row's whole prefix per
token (the path before cached decoding), 'cached' uses the model's cache. The round's time is
the slowest rank's, between two barriers. Without `--model` (or when the folder is missing) a
randomly initialised model of `configs/default.toml`'s shape is used.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model(folder: str):
    import torch

    from hetsp.attention import register_attention
    from hetsp.ssm_parallel import parallelize

    if folder and Path(folder).is_dir():
        from hetsp.generate import load_for_generation

        model, _ = load_for_generation(folder)
    else:
        from hetsp.config import load_config
        from hetsp.model_registry import build_model

        torch.manual_seed(0)
        model = build_model(load_config(ROOT / "configs" / "default.toml").model, 259)
    model.config._attn_implementation = register_attention()
    return parallelize(model).eval()


def held_out_texts(cache: Path = ROOT / "runs" / "funcbody_heldout_prompts.json") -> list[str]:
    """Every held-out function-body prompt (split as configs/copg_stdlib.toml splits them: by file,
    validation_fraction 0.02, seed 0). Parsing the standard library takes minutes on a loaded
    machine, so the list is kept in `cache` (git-ignored runs/)."""
    import json

    if cache.is_file():
        return json.loads(cache.read_text())
    from hetsp.config import DataConfig
    from hetsp.data.tasks.funcbody import load_funcbody

    _, val = load_funcbody(DataConfig(dataset="funcbody", format="prompt_completion", tokenizer="bytes",
                                      validation_fraction=0.02, validation_seed=0))
    texts = [r["prompt"] for r in val]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(texts))
    return texts


def held_out_prompts(n: int, max_tokens: int = 1024) -> list[list[int]]:
    """The first n held-out function-body prompts of at most `max_tokens` byte tokens."""
    from hetsp.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    out = [p for p in (tok.encode(t) for t in held_out_texts()) if len(p) <= max_tokens]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} held-out prompts of at most {max_tokens} tokens, asked for {n}")
    return out[:n]


def rank_round(folder: str, prompts_by_rank: list[list[list[int]]], k: int, new_tokens: int, use_cache: bool):
    """One sampling round on this rank: (seconds between barriers, completions)."""
    import torch
    import torch.distributed as dist

    from hetsp.generation.sampling import sample_in_lockstep

    rank = dist.get_rank()
    model = _model(folder)
    gen = torch.Generator().manual_seed(rank)
    dist.barrier()
    t0 = time.perf_counter()
    out = sample_in_lockstep(model, prompts_by_rank[rank], k, new_tokens, gen, rank, "cpu", temperature=0.8,
                             top_p=0.95, eos_token_id=None, kernel="torch_cpu", use_cache=use_cache)
    dist.barrier()
    return time.perf_counter() - t0, out


def main(argv=None) -> None:
    from hetsp.testing import RankPool

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/sft_stdlib_export")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--prompts-per-rank", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--modes", nargs="+", default=["full", "cached"], choices=["full", "cached"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    n = args.ranks * args.prompts_per_rank
    prompts = held_out_prompts(n)
    by_rank = [prompts[r::args.ranks] for r in range(args.ranks)]
    fn = importlib.import_module("bench.generation").rank_round
    load = os.getloadavg()
    pool = RankPool(args.ranks, start_timeout=1200)
    rows, outs = {}, {}
    try:
        for mode in args.modes:
            res = pool.run(fn, args.model, by_rank, args.k, args.new_tokens, mode == "cached", timeout=7200)
            rows[mode] = max(t for t, _ in res)
            outs[mode] = [o for _, o in res]
            print(f"{mode}: {rows[mode]:.1f} s", flush=True)
    finally:
        pool.close()
    load_end = os.getloadavg()
    tokens = n * args.k * args.new_tokens
    model_name = args.model if Path(args.model).is_dir() else "random init, configs/default.toml shape"
    lines = [
        f"Model: {model_name}. {args.ranks} simulated ranks (gloo, 1 thread each), {args.prompts_per_rank} held-out "
        f"function-body prompts per rank ({statistics.mean(len(p) for p in prompts):.0f} tokens on average, "
        f"{min(len(p) for p in prompts)} to {max(len(p) for p in prompts)}), k = {args.k}, {args.new_tokens} new tokens per row.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; load average {load[0]:.1f} at start, {load_end[0]:.1f} at end "
        "(shared with other jobs: absolute times are indicative).",
        "",
        "| decoding | round time (s) | generated tokens/s (all ranks) | speed-up |",
        "|---|---|---|---|",
    ]
    base = rows.get("full")
    for mode, t in rows.items():
        speed = f"{base / t:.1f}x" if base else "-"
        lines.append(f"| {mode} | {t:.1f} | {tokens / t:.0f} | {speed} |")
    if len(outs) == 2:
        same = sum(a == b for r in range(args.ranks) for a, b in zip(sum(outs["full"][r], []), sum(outs["cached"][r], [])))
        lines.append("")
        lines.append(f"Same sampled tokens (same generator) in {same} of {n * args.k} rows (fp32 model: a rare draw "
                     "at a probability boundary can differ by float32 rounding; the fp64 tests require equality).")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(f"# Sampling round time\n\nCommand: `PYTHONPATH=. python bench/generation.py {' '.join(argv or sys.argv[1:])}`\n\n{text}\n")


if __name__ == "__main__":
    main()
