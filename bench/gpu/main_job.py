"""Step `main_job`: the main job (configs/default.toml) for 20 steps on the GPU in bf16 with
4 simulated ranks, then its loss trend, tokens/s and peak memory from the run's metrics.

The rank program is this module (``hetsp-launch --module bench.gpu.main_job``): it runs
`hetsp.train.main` unchanged, except that when `datasets` is not installed (it does not fit
the offline node's 64 MiB budget: pyarrow alone is 55 MB) the embedded `stdlib` corpus is
read and tokenized without it. The documents, their order and their token ids are the same
as `datasets` gives (tests/test_gpu_check.py compares both here), so the batches and plans
are those of the real job; any other `data.dataset` is refused.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20
RANKS = 4
log = logging.getLogger("hetsp.data")


def stdlib_texts(data) -> list[str]:
    """The `stdlib` corpus's documents as `hetsp.data.sources.load_stdlib` reads them."""
    from hetsp.data.sources import stdlib_files

    if data.dataset != "stdlib":
        raise ValueError(f"data.dataset = {data.dataset!r}: without the datasets package only 'stdlib' can be read; "
                         "install datasets or use the stdlib corpus")
    root, rel = stdlib_files(data.max_documents)
    if not rel:
        raise ValueError(f"data.dataset = 'stdlib': no *.py files found under {root}")
    log.info("stdlib corpus (read without datasets): %d files under %s", len(rel), root)
    return [(root / p).read_bytes().decode("utf-8", errors="replace") for p in rel]


def tokenize_texts(texts: list[str], tokenizer, data) -> tuple[np.ndarray, np.ndarray, float]:
    """Same result as `hetsp.data.corpus.tokenize_dataset` on those texts: (tokens, offsets, seconds)."""
    t0 = time.perf_counter()
    ids = tokenizer.encode_batch(texts)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    tokens = np.concatenate(ids).astype(dtype, copy=False) if ids else np.zeros(0, dtype)
    return tokens, offsets, time.perf_counter() - t0


def use_datasets_free_corpus() -> None:
    """Point `build_data` at the readers above (in this process only)."""
    import hetsp.data.module as module

    module.load_documents = stdlib_texts
    module.tokenize_dataset = tokenize_texts


def rank_main(argv: list[str] | None = None) -> int:
    if importlib.util.find_spec("datasets") is None:
        use_datasets_free_corpus()
    from hetsp.train import main

    return main(argv)


def summarize(run_dir: Path) -> dict:
    """Loss trend, tokens/s, peak memory from a run folder's metrics.jsonl."""
    steps = [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
             if r.get("kind") == "train" and "loss" in r]
    if not steps:
        raise ValueError(f"{run_dir}/metrics.jsonl has no step records")
    losses = [r["loss"] for r in steps]
    k = max(1, len(losses) // 4)
    timed = steps[1:] or steps  # the first step pays compilation
    tok_s = sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed)
    peak = max((r.get("peak_mem_bytes") or 0) for r in steps)
    return dict(steps=len(steps), loss_first=float(np.mean(losses[:k])), loss_last=float(np.mean(losses[-k:])),
                losses=losses, tokens_per_s=tok_s, peak_mem_gib=peak / 2**30)


def run(rec, quick: bool = False) -> None:
    run_dir = Path(rec.path).resolve().parent.parent / "main_job"  # next to the check's steps/ folder
    steps = 5 if quick else STEPS
    cmd = [sys.executable, "-m", "launcher", "--simulate", str(RANKS), "--module", "bench.gpu.main_job",
           "--run-dir", str(run_dir), "configs/default.toml", "--set", f"train.steps={steps}",
           "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", 'train.dtype="bf16"']
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (run_dir / "launcher.log").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "launcher.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        rec.finish("fail", f"main job exited {res.returncode}: {tail[0][:200]} (log: {run_dir}/launcher.log)")
        return
    s = summarize(run_dir)
    rec.row("main job, 4 simulated ranks on one GPU, bf16", steps=s["steps"], loss_first_quarter=s["loss_first"],
            loss_last_quarter=s["loss_last"], tokens_per_s=s["tokens_per_s"], peak_mem_gib_rank0=s["peak_mem_gib"])
    trend = "falls" if s["loss_last"] < s["loss_first"] else "does NOT fall"
    rec.finish("ok" if s["loss_last"] < s["loss_first"] else "fail",
               f"{s['steps']} steps: loss {s['loss_first']:.3f} -> {s['loss_last']:.3f} ({trend}), "
               f"{s['tokens_per_s']:.0f} tok/s, peak {s['peak_mem_gib']:.2f} GiB on rank 0", losses=s["losses"])


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]))
