"""Cost of `<bkspc>` sequences: tokens/s of forward+backward per mixer kind (prints a table; not a test).

For each mixer kind, one layer (mixer + SwiGLU MLP) of `HybridForCausalLM` runs the hetsp
training path on a group of `--group` ranks (gloo on CPU; ring attention with the torch CPU
kernel, the SSM mixers parallelised by `hetsp.ssm_parallel.parallelize`) on a sequence of L
tokens of which about 10% of positions are inserted (token, `<bkspc>`) pairs, and on the same
sequence without the pairs (today's path: no structure in the shard context). Tokens/s counts
the tokens fed (the whole sequence per step, the slowest rank's time).

    python bench/backspace.py [--lengths 512 2048] [--group 1] [--hidden 64] [--repeats 3] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hetsp.attention import make_shard_context, register_attention  # noqa: E402
from hetsp.backspace import stack_structure  # noqa: E402
from models import HybridConfig, HybridForCausalLM  # noqa: E402

KINDS = ("attention", "s4d", "ema", "mamba2", "seqboat")
VOCAB = 64
BK = VOCAB - 1
METHOD = {
    "attention": "ring attention, torch CPU flash op with an additive lifetime mask per block",
    "s4d": "tree scan per segment (masked convolution over in-chunk ancestors + anchor states, chunk 32); anchors' states passed across shards",
    "ema": "tree scan per segment (masked convolution over in-chunk ancestors + anchor states, chunk 32); anchors' states passed across shards",
    "mamba2": "conv over ancestors (K gathers, other shards' rows exchanged) + tree SSD scan per segment; anchors' states passed across shards",
    "seqboat": "EMA tree scan with state passing + GAU over activated ancestors (dense mask), anchors' last W activated passed across shards",
}


def _layer(kind: str, hidden: int):
    torch.manual_seed(0)
    cfg = HybridConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, layer_pattern=kind, s4d_state_size=32, ema_dim=16,
        mamba_d_state=32, mamba_head_dim=32, mamba_chunk_size=64, scan_chunk_size=64,
        seqboat_window=128, seqboat_z_dim=32, seqboat_v_dim=2 * hidden,
    )
    cfg._attn_implementation = register_attention()
    return HybridForCausalLM(cfg).train()


def _with_pairs(length: int, frac: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(ids with about `frac` of positions in inserted pairs, the same ids without the pairs)."""
    rng = random.Random(seed)
    ids, plain = [], []
    while len(ids) < length:
        if ids and len(ids) + 2 <= length and rng.random() < frac / 2:
            ids += [rng.randrange(VOCAB - 1), BK]
        else:
            t = rng.randrange(VOCAB - 1)
            ids.append(t)
            plain.append(t)
    return ids, plain


def _time(model, ids, structure, repeats, group=1):
    import torch.distributed as dist

    rank = dist.get_rank() if group > 1 else 0
    ctx = make_shard_context([len(ids)], 0, group, rank, "cpu", kernel="torch_cpu", structure=structure)
    x = torch.tensor([ids])[:, list(ctx.layout.token_index)]
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        if group > 1:
            dist.barrier()
        t0 = time.perf_counter()
        out = model(input_ids=x, position_ids=ctx.positions[None], hetsp_shard=ctx).logits
        out.square().mean().backward()
        if group > 1:
            dist.barrier()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rows(lengths, hidden, frac, repeats, threads, group=1):
    """(kind, L, pops, plain tokens, tokens, plain seconds, seconds) per kind and length (run on every rank)."""
    from hetsp.ssm_parallel import parallelize

    torch.set_num_threads(threads)
    out = []
    for kind in KINDS:
        model = parallelize(_layer(kind, hidden))
        for length in lengths:
            ids, plain = _with_pairs(length, frac)
            structure = stack_structure(ids, BK, VOCAB)
            t_plain = _time(model, plain, None, repeats, group)
            t_tree = _time(model, ids, structure, repeats, group)
            out.append((kind, length, structure.num_pops, len(plain), len(ids), t_plain, t_tree))
    return out


def decode_table(hidden: int, steps: int = 64) -> list[str]:
    """ms per decoding step of a five-layer model (one layer of each kind): pushes, and pops (which
    restore the parent's states and also run the <bkspc> token), against recomputing the full
    forward of the structure at every action."""
    from models.backspace_decoding import BackspaceDecoder

    torch.manual_seed(0)
    cfg = HybridConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, layer_pattern=",".join(KINDS), s4d_state_size=32, ema_dim=16,
        mamba_d_state=32, mamba_head_dim=32, mamba_chunk_size=64, scan_chunk_size=64,
        seqboat_window=128, seqboat_z_dim=32, seqboat_v_dim=2 * hidden,
    )
    model = HybridForCausalLM(cfg).eval()
    dec = BackspaceDecoder(model, BK)
    prompt = list(range(16))
    push, pop, recompute = [], [], []
    actions: list[int] = []

    def full_forward() -> None:
        """What a decoder without states does per action: the whole structure's forward (last logits)."""
        ids = prompt + actions
        s = stack_structure(ids, BK, VOCAB, prompt_length=len(prompt))
        t0 = time.perf_counter()
        model(input_ids=torch.tensor([ids]), parents=torch.tensor([s.parents]))
        recompute.append(time.perf_counter() - t0)

    with torch.no_grad():
        dec.prefill(prompt)
        for i in range(steps):
            t0 = time.perf_counter()
            dec.step(i % (VOCAB - 1))
            push.append(time.perf_counter() - t0)
            actions.append(i % (VOCAB - 1))
            full_forward()
            if i % 2:
                t0 = time.perf_counter()
                dec.step(BK)
                pop.append(time.perf_counter() - t0)
                actions.append(BK)
                full_forward()
    return [
        "| decoding step (5 layers, one of each kind) | ms (median) |",
        "|---|---|",
        f"| push a token | {1e3 * statistics.median(push):.2f} |",
        f"| pop (<bkspc>: restore parent states, run the <bkspc>, restore again) | {1e3 * statistics.median(pop):.2f} |",
        f"| recompute instead: full forward of the structure so far ({len(prompt)} to {len(prompt) + len(actions)} tokens) | "
        f"{1e3 * statistics.median(recompute):.2f} |",
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--group", type=int, default=1, help="ranks of the group (gloo processes on this host)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--frac", type=float, default=0.1, help="fraction of positions in inserted pairs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--decode", action="store_true", help="only time decoding steps (push, pop)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.decode:
        print("\n".join(decode_table(args.hidden)))
        return
    load = os.getloadavg()
    lines = [
        "| mixer | L | pairs (positions) | plain tok/s | with pairs tok/s | time ratio | method |",
        "|---|---|---|---|---|---|---|",
    ]
    bench_args = (args.lengths, args.hidden, args.frac, args.repeats, args.threads)
    if args.group == 1:
        rows = _rows(*bench_args)
    else:
        from hetsp.testing import RankPool

        pool = RankPool(args.group, start_timeout=900)
        per_rank = pool.run(_rows, *bench_args, args.group, timeout=3600)
        pool.close()
        # The step of a group lasts as long as its slowest rank.
        rows = [r[:5] + (max(x[i][5] for x in per_rank), max(x[i][6] for x in per_rank)) for i, r in enumerate(per_rank[0])]
    for kind, length, pops, n_plain, n_ids, t_plain, t_tree in rows:
        lines.append(
            f"| {kind} | {length} | {pops} ({2 * pops / length:.0%}) | "
            f"{n_plain / t_plain:,.0f} | {n_ids / t_tree:,.0f} | {t_tree / t_plain:.2f} | {METHOD[kind]} |"
        )
    head = [
        f"# Cost of <bkspc> sequences (forward+backward, one layer, group of {args.group} rank(s))",
        "",
        f"Command: `python bench/backspace.py --lengths {' '.join(map(str, args.lengths))} --group {args.group} --hidden {args.hidden} "
        f"--frac {args.frac} --repeats {args.repeats} --threads {args.threads}`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} thread(s); load average at start {load[0]:.1f} (the machine was shared with other jobs: "
        "timings are indicative, ratios more than absolute numbers).",
        "",
        "'plain' is the same sequence without the inserted pairs, on today's path (no structure); "
        "'time ratio' is the time of the sequence with pairs over the time of the plain one (the former has "
        "more tokens).",
        "",
    ]
    text = "\n".join(head + lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
