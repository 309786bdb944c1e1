"""SequenceMatch on the standard library corpus: a model fine-tuned with SequenceMatch against the
maximum-likelihood run with the same steps and data (configs/sequencematch_stdlib.toml says how to
train and export both).

1. Validation cross-entropy (nats per target byte) on the held-out sequences of the config's data
   split: over the whole vocabulary (<bkspc> included), and over the real vocabulary only
   (<bkspc> removed from the softmax, so mass on <bkspc> is not counted as a loss).
2. Recovery: take held-out text, sample a continuation with <bkspc> enabled, force a wrong byte
   after `--before` sampled actions, then sample `--within` more actions: the decode recovers when
   one of them pops the wrong byte. The control forces nothing (the byte is the model's own
   sample) and counts the same pops ("false pops"). Also reported: the mean probability of
   <bkspc> right after the forced byte. Decoding uses models.backspace_decoding.BackspaceDecoder
   (one process, the exported model with its cache).

    python bench/sequencematch_stdlib.py --sm runs/sequencematch_stdlib_export \
        --ml runs/sequencematch_stdlib_ml_export --out bench/results/sequencematch_stdlib.md
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402
from hetsp.config import load_config  # noqa: E402
from hetsp.data import build_data  # noqa: E402
from hetsp.loading import resolve_config  # noqa: E402

PRINTABLE = list(range(32, 127)) + [10]


def load(folder: str):
    from transformers import AutoModelForCausalLM

    import models  # noqa: F401  registers the hybrid family

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    bk = model.config.bkspc_token_id if hasattr(model.config, "bkspc_token_id") else None
    if bk is None:
        bk = json.loads((Path(folder) / "hetsp_export.json").read_text()).get("bkspc_token_id")
    if bk is None:
        raise SystemExit(f"{folder}: no bkspc_token_id in config.json or hetsp_export.json (not a SequenceMatch export)")
    return model, int(bk)


@torch.no_grad()
def cross_entropy(model, seqs, bk: int) -> tuple[float, float]:
    total, total_real, n = 0.0, 0.0, 0
    for s in seqs:
        ids = torch.tensor([list(s)])
        logits = model(input_ids=ids).logits[0, :-1].double()
        target = ids[0, 1:]
        total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        real = logits.clone()
        real[:, bk] = float("-inf")
        total_real += float(torch.nn.functional.cross_entropy(real, target, reduction="sum"))
        n += len(target)
    return total / n, total_real / n


@torch.no_grad()
def recovery(model, bk: int, seqs, decodes: int, prompt_len: int, before: int, within: int, force: bool, seed: int):
    """(fraction of decodes whose byte at position `before` is popped within `within` actions, mean
    probability of <bkspc> right after that byte)."""
    from models.backspace_decoding import BackspaceDecoder

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    popped, p_bk = 0, 0.0
    usable = [s for s in seqs if len(s) > prompt_len + 1]

    def sample(dec, logits):
        scores = logits.double().clone()
        if not dec.can_pop():
            scores[bk] = float("-inf")
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=gen))

    for _ in range(decodes):
        s = rng.choice(usable)
        start = rng.randrange(0, len(s) - prompt_len)
        dec = BackspaceDecoder(model, bk)
        logits = dec.prefill([int(t) for t in s[start:start + prompt_len]])
        for _ in range(before):
            logits = dec.step(sample(dec, logits))
        if force:
            top = int(logits[:bk].argmax())
            token = rng.choice([t for t in PRINTABLE if t != top])
        else:
            token = sample(dec, logits)
            while token == bk:  # the control needs a pushed token
                token = sample(dec, torch.where(torch.arange(len(logits)) == bk, float("-inf"), logits))
        logits = dec.step(token)
        depth = len(dec.stack)  # the byte sits at depth - 1
        p_bk += float(torch.softmax(logits.double(), -1)[bk])
        for _ in range(within):
            logits = dec.step(sample(dec, logits))
            if len(dec.stack) < depth:
                popped += 1
                break
    return popped / decodes, p_bk / decodes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/sequencematch_stdlib.toml")
    ap.add_argument("--sm", default="runs/sequencematch_stdlib_export")
    ap.add_argument("--ml", default="runs/sequencematch_stdlib_ml_export")
    ap.add_argument("--val-sequences", type=int, default=16)
    ap.add_argument("--decodes", type=int, default=400)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--before", type=int, default=4)
    ap.add_argument("--within", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = resolve_config(load_config(args.config))
    data = build_data(cfg.data, cfg.run.seed)
    val = [data.val.get(i) for i in range(min(args.val_sequences, len(data.val)))]
    rows = []
    for name, folder in (("maximum likelihood", args.ml), ("SequenceMatch", args.sm)):
        t0 = time.perf_counter()
        model, bk = load(folder)
        ce, ce_real = cross_entropy(model, val, bk)
        rec, p_rec = recovery(model, bk, val, args.decodes, args.prompt_len, args.before, args.within, True, args.seed)
        false, p_false = recovery(model, bk, val, args.decodes, args.prompt_len, args.before, args.within, False, args.seed)
        rows.append((name, folder, ce, ce_real, rec, p_rec, false, p_false, time.perf_counter() - t0))
        print(rows[-1], flush=True)
    n_tok = sum(len(s) - 1 for s in val)
    lines = ["# SequenceMatch on the standard library corpus\n",
             f"Command: `python bench/sequencematch_stdlib.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
             f"Validation: the first {len(val)} held-out sequences of `{args.config}`'s data split ({n_tok} target bytes). "
             f"Recovery: {args.decodes} decodes per cell from {args.prompt_len}-byte windows of the same held-out text, "
             f"{args.before} sampled actions, then a forced wrong byte (uniform over printable ASCII and newline, never "
             f"the model's top choice) or, for the control, the model's own sample; success: a `<bkspc>` pops that byte "
             f"within {args.within} sampled actions (temperature 1, `<bkspc>` enabled).\n",
             "| model | export | val CE (all ids) | val CE (real vocabulary) | recovers a forced byte | P(<bkspc>) after it "
             "| pops its own byte (control) | P(<bkspc>) after it | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, folder, ce, ce_real, rec, p_rec, false, p_false, sec in rows:
        lines.append(f"| {name} | `{folder}` | {ce:.4f} | {ce_real:.4f} | {rec:.3f} | {p_rec:.4f} | {false:.3f} | {p_false:.4f} | {sec:.0f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
