"""Peak resident memory per rank while loading a checkpoint (`model.init_from`), ZeRO-1 against ZeRO-3.

Writes a random Llama (sharded safetensors) about 30 times the default job's model, then
loads it on N simulated CPU ranks (a fresh gloo world per stage) exactly as training does
(`hetsp.loading.load_pretrained`). Each rank resets its peak RSS counter
(/proc/self/clear_refs) after its imports, so the figure is the peak while loading; the
baseline (RSS before loading) is reported next to it. Prints a markdown table:

    python bench/load_memory.py --ranks 4 --layers 24 --out bench/results/load_memory.md
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False)
DEFAULT_JOB_PARAMS = 1.11e6  # configs/default.toml, as the training log reports it


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def load_and_measure(folder: str, warm_folder: str, zero_stage: int) -> dict:
    """On every rank: load the checkpoint for `zero_stage`; RSS before and peak RSS while loading, in MiB.

    A tiny checkpoint of the same family is loaded first the same way, so that imports and
    one-time allocations (model classes, DeepSpeed's partitioning machinery) are in the baseline."""
    import torch
    import torch.distributed as dist

    from hetsp.config import config_from_dict
    from hetsp.loading import load_pretrained, num_parameters

    rank = dist.get_rank()
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(dist.get_world_size()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29591")
    import deepspeed  # noqa: F401  imported before the baseline, as training has it

    cfg = config_from_dict({"model": {"init_from": folder}, "train": {"zero_stage": zero_stage, "dtype": "fp32"}})
    warm = config_from_dict({"model": {"init_from": warm_folder}, "train": {"zero_stage": zero_stage, "dtype": "fp32"}})
    del_me = load_pretrained(warm.model, warm.train, dist.get_world_size(), torch.device("cpu"), None)
    del del_me
    gc.collect()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    model = load_pretrained(cfg.model, cfg.train, dist.get_world_size(), torch.device("cpu"), None)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    held = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in model.parameters())
    out = dict(before_mib=before / 1024, peak_mib=peak / 1024, seconds=seconds, params=num_parameters(model),
               held_mib=held / 2**20)
    del model
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"], help="decoder layers of the model")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from hetsp.testing import RankPool

    with tempfile.TemporaryDirectory(prefix="hetsp_load_bench_") as tmp:
        model = LlamaForCausalLM(LlamaConfig(**dict(MODEL, num_hidden_layers=args.layers)))
        num_params = sum(q.numel() for q in model.parameters())
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="40MB")
        del model
        warm = os.path.join(tmp, "warm")
        LlamaForCausalLM(LlamaConfig(**dict(MODEL, vocab_size=64, hidden_size=64, intermediate_size=64,
                                            num_hidden_layers=1))).save_pretrained(warm, safe_serialization=True)
        files = sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors"))
        largest = max(os.path.getsize(os.path.join(tmp, f)) for f in files) / 2**20
        size_mib = num_params * 4 / 2**20
        rows = []
        for stage in (1, 3):
            pool = RankPool(args.ranks)
            try:
                res = pool.run(load_and_measure, tmp, warm, stage, timeout=1200)
            finally:
                pool.close()
            rows.append((stage, res))
    lines = [
        f"Loading a {num_params / 1e6:.1f}M-parameter Llama ({num_params / DEFAULT_JOB_PARAMS:.0f}x the default job's "
        f"model; {size_mib:.0f} MiB in fp32, {len(files)} safetensors shards, largest {largest:.0f} MiB) on "
        f"{args.ranks} simulated CPU ranks. Peak RSS while loading, per rank (MiB); 'added' = peak - RSS before loading.",
        "",
        "| ZeRO stage | rank | RSS before | peak while loading | added | parameters held after | load time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage, res in rows:
        for r, x in enumerate(res):
            lines.append(f"| {stage} | {r} | {x['before_mib']:.0f} | {x['peak_mib']:.0f} | "
                         f"{x['peak_mib'] - x['before_mib']:.0f} | {x['held_mib']:.0f} | {x['seconds']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
