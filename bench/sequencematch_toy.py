"""The counting toy of REFERENCE.md section 4: maximum likelihood against SequenceMatch.

Prompt [BOS, x0]; target x0+1 .. x0+10 (mod 10), EOS. At decode time, before each action, a wrong
digit is forced with probability eps (a digit other than the correct next token of the stack).
A decode succeeds when the final text (the stack after the pops) is exactly the target followed
by EOS within `--max-actions` actions. Decoding is greedy over the vocabulary plus `<bkspc>`; a
`<bkspc>` pops the last generated token (never the prompt).

Both models are the same tiny hybrid model (two attention layers), trained one process through hetsp's
executor (`run_plan`, the training path): maximum likelihood on clean sequences; SequenceMatch
on noise-injected sequences (hetsp.data.noise, uniform wrong digits) with behaviour cloning for
the first K steps, then the convex mix. Decoding runs every active decode's context as one
padded batch (the semantics of hetsp/backspace.py: after a pop, the context is the stack plus
the `<bkspc>`); `--check` compares a few decodes with models.backspace_decoding.BackspaceDecoder.

    python bench/sequencematch_toy.py --out bench/results/sequencematch_toy.md
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402
from hetsp.backspace import stack_structure  # noqa: E402
from hetsp.config import ModelConfig  # noqa: E402
from hetsp.data.noise import inject_noise  # noqa: E402
from hetsp.executor import PlainEngine, run_plan  # noqa: E402
from hetsp.model_registry import build_model  # noqa: E402
from hetsp.objectives.lm import LanguageModeling  # noqa: E402
from hetsp.objectives.sequencematch import SequenceMatch, SequenceMatchConfig  # noqa: E402
from hetsp.plan import Group, MicroBatch, Plan  # noqa: E402
from hetsp.ssm_parallel import parallelize  # noqa: E402

BOS, EOS, BK = 10, 11, 12
VOCAB = 13
MODEL = ModelConfig(family="hybrid", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    extra=dict(layer_pattern="attention,attention"))


def example(x0: int) -> list[int]:
    return [BOS, x0] + [(x0 + k) % 10 for k in range(1, 11)] + [EOS]


def train(kind: str, steps: int, batch: int, lr: float, seed: int, sm: SequenceMatchConfig, log) -> torch.nn.Module:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = parallelize(build_model(MODEL, VOCAB, attn_implementation="eager"))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    objective = LanguageModeling() if kind == "ml" else SequenceMatch(sm, eos_token_id=EOS, bkspc_token_id=BK)
    engine = PlainEngine(model)
    t0 = time.perf_counter()
    for step in range(steps):
        if kind == "ml":
            seqs = [example(rng.randrange(10)) for _ in range(batch)]
            structures = None
        else:
            objective.set_step(step)
            seqs = [inject_noise(example(rng.randrange(10)), sm.noise_p, rng, BK, num_real=10, prompt_length=2) for _ in range(batch)]
            structures = [stack_structure(s, BK, VOCAB, 2) for s in seqs]
        lengths = [len(s) for s in seqs]
        plan = Plan(lengths, (MicroBatch((Group(0, 1, tuple(range(batch))),)),))
        opt.zero_grad()
        res = run_plan(engine, plan, seqs, 0, 1, torch.device("cpu"), objective, "torch_cpu", structures=structures)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  {kind} step {step}: loss {res.loss_sum / res.num_units:.4f} ({time.perf_counter() - t0:.0f}s)")
    return model


@torch.no_grad()
def last_logits(model, contexts: list[list[int]]) -> torch.Tensor:
    """Each context run as a plain sequence (right-padded: causal layers never see the padding)."""
    n = max(len(c) for c in contexts)
    ids = torch.tensor([c + [0] * (n - len(c)) for c in contexts])
    logits = model(input_ids=ids, use_cache=False).logits
    return logits[torch.arange(len(contexts)), torch.tensor([len(c) - 1 for c in contexts])]


def decode(model, n: int, eps: float, seed: int, max_actions: int) -> tuple[int, list[dict]]:
    """n greedy decodes with forced wrong digits; returns (successes, per-decode records)."""
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        x0 = rng.randrange(10)
        recs.append(dict(target=example(x0), stack=[BOS, x0], ctx=[BOS, x0], actions=[], done=False, forced=0))
    for _ in range(max_actions):
        active = [r for r in recs if not r["done"]]
        if not active:
            break
        logits = last_logits(model, [r["ctx"] for r in active])
        for r, lg in zip(active, logits):
            pos = len(r["stack"])
            right = r["target"][pos] if pos < len(r["target"]) and r["stack"] == r["target"][:pos] else None
            if rng.random() < eps:
                a = rng.choice([d for d in range(10) if d != right])
                r["forced"] += 1
            else:
                lg = lg.clone()
                if len(r["stack"]) <= 2:
                    lg[BK] = float("-inf")  # never pop the prompt
                a = int(lg.argmax())
            r["actions"].append(a)
            if a == BK:
                r["stack"].pop()
                r["ctx"] = r["stack"] + [BK]
            else:
                r["stack"].append(a)
                r["ctx"] = list(r["stack"])
                r["done"] = a == EOS
    ok = sum(r["done"] and r["stack"] == r["target"] for r in recs)
    return ok, recs


def check_against_decoder(model, recs, k: int = 5) -> float:
    """Replay k decodes' actions through BackspaceDecoder; the largest |logit difference|."""
    from models.backspace_decoding import BackspaceDecoder

    worst = 0.0
    for r in recs[:k]:
        dec = BackspaceDecoder(model, BK)
        ctx = list(r["target"][:2])
        lg = dec.prefill(ctx)
        stack = list(ctx)
        for a in r["actions"]:
            want = last_logits(model, [ctx])[0]
            worst = max(worst, float((lg - want).abs().max()))
            lg = dec.step(a)
            if a == BK:
                stack.pop()
                ctx = stack + [BK]
            else:
                stack.append(a)
                ctx = list(stack)
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--decodes", type=int, default=1000)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--max-actions", type=int, default=40)
    ap.add_argument("--noise-p", type=float, default=0.2)
    ap.add_argument("--gamma", type=float, default=0.998)
    ap.add_argument("--chi2", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--bc-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=str, default="")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: tiny shapes, shared machine)")
    ap.add_argument("--check", action="store_true", help="replay a few decodes through BackspaceDecoder")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines: list[str] = []
    log = print
    sm = SequenceMatchConfig(gamma=args.gamma, chi2=args.chi2, w_data=1.0, alpha=args.alpha, bc_steps=args.bc_steps,
                             noise_p=args.noise_p)
    t0 = time.perf_counter()
    models = {kind: train(kind, args.steps, args.batch, args.lr, args.seed, sm, log) for kind in ("ml", "sm")}
    train_s = time.perf_counter() - t0
    rows = []
    for eps in args.eps:
        row = [eps, (1 - eps) ** 11]
        for kind in ("ml", "sm"):
            ok, recs = decode(models[kind].eval(), args.decodes, eps, args.seed + 1 + int(eps * 1000), args.max_actions)
            pops = sum(a == BK for r in recs for a in r["actions"])
            row += [ok / args.decodes, pops / args.decodes]
            if args.check and eps == args.eps[0]:
                log(f"  {kind}: BackspaceDecoder replay, max |logit difference| {check_against_decoder(models[kind], recs):.2e}")
        rows.append(row)
        log(f"eps {eps}: ML {row[2]:.3f}, SequenceMatch {row[4]:.3f} (1-eps)^11 = {row[1]:.3f}")
    lines.append("# Counting toy: maximum likelihood vs SequenceMatch\n")
    lines.append(f"Command: `python bench/sequencematch_toy.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    lines.append(f"Model: hybrid (two attention layers), hidden {MODEL.hidden_size}, {MODEL.num_layers} layers, vocabulary 10 digits + "
                 f"BOS, EOS, <bkspc>; {args.steps} Adam steps (lr {args.lr}) of {args.batch} sequences each, one process "
                 f"through hetsp's executor; both trainings took {train_s:.0f} s on a shared 2-core CPU.\n")
    lines.append(f"SequenceMatch: training noise p = {args.noise_p} (uniform wrong digits), gamma = {args.gamma}, "
                 f"chi2 c = {args.chi2}, value term on data only (w_data = 1), behaviour cloning for {args.bc_steps} "
                 f"steps then (1 - alpha) ML + alpha SM with alpha = {args.alpha}. Maximum likelihood: clean sequences.\n")
    lines.append(f"Decoding: greedy, {args.decodes} decodes per cell, at most {args.max_actions} actions; before each "
                 "action a wrong digit is forced with probability eps. Success: the final text is exactly the target "
                 "and EOS.\n")
    lines.append("| eps | (1-eps)^11 | ML success | ML pops/decode | SequenceMatch success | SM pops/decode |")
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.2f} | {r[4]:.3f} | {r[5]:.2f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
