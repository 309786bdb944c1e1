"""Rank functions for the generation tests (importable by reference from the rank pool)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def hybrid_model():
    """The hybrid model with all five mixer kinds, fp32, ring attention and parallelized SSM layers
    (as training prepares it); the same weights in every process."""
    import models
    from hetsp.attention import register_attention
    from hetsp.ssm_parallel import parallelize

    from .test_models import ALL_KINDS, tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(ALL_KINDS)
    cfg._attn_implementation = register_attention()
    return parallelize(models.HybridForCausalLM(cfg)).eval()


def sample_in_engine(model, prompts_by_rank, k, max_new, zero_stage):
    """Each rank samples for its own prompts with `model` inside a DeepSpeed engine (ZeRO-`zero_stage`)."""
    import os

    from hetsp.config import TrainConfig
    from hetsp.engine import build_engine
    from hetsp.generation.sampling import sample_in_lockstep

    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("LOCAL_RANK", str(rank))
    engine = build_engine(model, TrainConfig(steps=1, zero_stage=zero_stage, dtype="fp32"), world, torch.device("cpu"))
    engine.eval()
    gen = torch.Generator().manual_seed(100 + rank)
    out = sample_in_lockstep(engine.module, prompts_by_rank[rank], k, max_new, gen, rank, torch.device("cpu"),
                             temperature=0.9, top_p=0.9, eos_token_id=3, kernel="reference")
    engine.destroy()
    return out


def hybrid_zero3_sampling(prompts_by_rank, k, max_new):
    """`sample_in_engine` with the hybrid model under ZeRO-3 (cached decoding of every mixer kind)."""
    return sample_in_engine(hybrid_model(), prompts_by_rank, k, max_new, 3)
