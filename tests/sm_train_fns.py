"""Rank functions for tests/test_sequencematch_train.py and tests/test_sequencematch_noise.py: the
training loop with objective sequencematch, recording what reaches the executor."""

from __future__ import annotations

import copy

import torch.distributed as dist

from . import train_fns


def _run_train_observed(cfg_dict: dict, resume: bool, observe):
    """`train_fns.run_train` with `run_plan` wrapped: `observe(sequences, structures)` sees every
    training call (not the read-only ones). Rank 0 returns run_train's answer."""
    import hetsp.executor as executor

    original = executor.run_plan

    def recording(engine, plan, sequences, *args, **kwargs):
        if kwargs.get("train", True) and kwargs.get("read_logits") is None:
            observe(sequences, kwargs.get("structures") or [])
        return original(engine, plan, sequences, *args, **kwargs)

    executor.run_plan = recording
    try:
        return train_fns.run_train(cfg_dict, resume)
    finally:
        executor.run_plan = original


def run_train_recording(cfg_dict: dict, resume: bool = False):
    """Rank 0 also returns, per training call of run_plan, (number of `<bkspc>` in the batch, pops in
    the structures passed, model-generated trajectories in the batch)."""
    from hetsp.data.tokenizer import ByteTokenizer

    bk = ByteTokenizer(bkspc=True).bkspc_token_id
    seen = []

    def observe(sequences, structures):
        seen.append((sum(list(s).count(bk) for s in sequences), sum(s.num_pops for s in structures if s is not None),
                     sum(getattr(s, "source", "data") == "model" for s in sequences)))

    out = _run_train_observed(cfg_dict, resume, observe)
    return None if dist.get_rank() != 0 else (*out, seen)


def run_train_noise(cfg_dict: dict, resume: bool = False):
    """Rank 0 also returns, per trained sequence, its injected wrong tokens as (wrong token, the target
    it was inserted before) and whether it still held draws to make."""
    seen = []

    def observe(sequences, structures):
        for s in sequences:
            noise = getattr(s, "noise", None) or []
            seen.append(([(s[j], s[j + 2] if j + 2 < len(s) else None) for j, n in enumerate(noise) if n],
                         bool(getattr(s, "draws", None))))

    out = _run_train_observed(cfg_dict, resume, observe)
    return None if dist.get_rank() != 0 else (*out, seen)


def stop_and_resume(pool, fn, cfg_dict: dict, stop_after: int):
    """Run `fn` with train.stop_after = `stop_after`, then resumed to the end; rank 0's answer of the
    resumed part (start step, the run folder's records of both parts, ...)."""
    first = copy.deepcopy(cfg_dict)
    first["train"]["stop_after"] = stop_after
    pool.run(fn, first, timeout=900)
    second = copy.deepcopy(first)
    second["train"]["stop_after"] = 0
    return [r for r in pool.run(fn, second, True, timeout=900) if r][0]
