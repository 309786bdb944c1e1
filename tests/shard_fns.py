"""Functions the shard-context tests send to ranks (importable by reference)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def empty_rank_error(cfg, state_dict, lengths):
    """Every rank of the world builds its context for `lengths` on one group and runs a stock
    model; returns (error message or None, seconds until it came back)."""
    from transformers import AutoModelForCausalLM

    from hetsp.attention import make_shard_context, register_attention

    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register_attention()).double()
    model.load_state_dict(state_dict)
    t0 = time.perf_counter()
    try:
        ctx = make_shard_context(lengths, 0, dist.get_world_size(), dist.get_rank(), "cpu")
        ids = torch.zeros((1, ctx.num_tokens), dtype=torch.long)
        model(input_ids=ids, position_ids=ctx.positions[None], hetsp_shard=ctx)
    except ValueError as err:
        return str(err), time.perf_counter() - t0
    return None, time.perf_counter() - t0
