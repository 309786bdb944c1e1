"""Rank functions for tests/test_sequencematch_train.py: the training loop with objective
sequencematch, recording what reaches the executor."""

from __future__ import annotations

import torch.distributed as dist

from . import train_fns


def run_train_recording(cfg_dict: dict, resume: bool = False):
    """`train_fns.run_train` with `run_plan` wrapped: rank 0 also returns, per training call of
    run_plan, (number of `<bkspc>` in the batch, pops in the structures passed, model-generated
    trajectories in the batch)."""
    import hetsp.executor as executor
    from hetsp.data.tokenizer import ByteTokenizer

    bk = ByteTokenizer(bkspc=True).bkspc_token_id
    seen = []
    original = executor.run_plan

    def recording(engine, plan, sequences, *args, **kwargs):
        if kwargs.get("train", True):
            structures = kwargs.get("structures") or []
            seen.append((sum(list(s).count(bk) for s in sequences), sum(s.num_pops for s in structures if s is not None),
                         sum(getattr(s, "source", "data") == "model" for s in sequences)))
        return original(engine, plan, sequences, *args, **kwargs)

    executor.run_plan = recording
    try:
        out = train_fns.run_train(cfg_dict, resume)
    finally:
        executor.run_plan = original
    return None if dist.get_rank() != 0 else (*out, seen)
