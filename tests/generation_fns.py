"""Rank functions for the generation tests (importable by reference from the rank pool)."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def every_parameter_gathered():
    """ZeRO-3 with no persistent parameter (`stage3_param_persistence_threshold` 0) while inside:
    DeepSpeed keeps parameters below 1e5 elements whole on every rank, which would leave a tiny
    model's forwards without any gather; with none kept, every forward gathers every parameter,
    as a real model's large ones are, so ranks with different forward counts hang."""
    from hetsp import engine

    original = engine.deepspeed_config

    def config(*args, **kwargs):
        out = original(*args, **kwargs)
        if out["zero_optimization"]["stage"] == 3:
            out["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return out

    engine.deepspeed_config = config
    try:
        yield
    finally:
        engine.deepspeed_config = original


def _engine(model, zero_stage):
    """`model` inside a DeepSpeed engine (ZeRO-`zero_stage`, fp32) on this pool rank, in eval mode."""
    import os

    from hetsp.config import TrainConfig
    from hetsp.engine import build_engine

    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("LOCAL_RANK", str(rank))
    with every_parameter_gathered():
        engine = build_engine(model, TrainConfig(steps=1, zero_stage=zero_stage, dtype="fp32"), world, torch.device("cpu"))
    engine.eval()
    return engine


def sample_in_engine(model, prompts_by_rank, k, max_new, zero_stage):
    """Each rank samples for its own prompts with `model` inside a DeepSpeed engine (ZeRO-`zero_stage`)."""
    from hetsp.generation.sampling import sample_in_lockstep

    rank = dist.get_rank()
    engine = _engine(model, zero_stage)
    gen = torch.Generator().manual_seed(100 + rank)
    out = sample_in_lockstep(engine.module, prompts_by_rank[rank], k, max_new, gen, rank, torch.device("cpu"),
                             temperature=0.9, top_p=0.9, eos_token_id=3, kernel="reference")
    engine.destroy()
    return out


def diverse_beams_in_engine(model, spreads, num_beams, num_groups, diversity, max_new, eos, zero_stage):
    """For each spread (prompts by rank), every rank's Diverse Beam Search of its own prompts with
    `model` inside a DeepSpeed engine (ZeRO-`zero_stage`): (tokens, score, finished) of every
    beam, by prompt and group."""
    from hetsp.generation.diverse_beam import diverse_beam_in_lockstep

    rank = dist.get_rank()
    engine = _engine(model, zero_stage)
    out = []
    for spread in spreads:
        found = diverse_beam_in_lockstep(engine.module, spread[rank], num_beams, num_groups, diversity, max_new, eos,
                                         torch.device("cpu"), "reference")
        out.append([[[(b.tokens, b.score, b.finished) for b in g] for g in groups] for groups in found])
    engine.destroy()
    return out


def hybrid_zero3_sampling(prompts_by_rank, k, max_new):
    """`sample_in_engine` with the hybrid model under ZeRO-3 (cached decoding of every mixer kind)."""
    return sample_in_engine(hybrid_model(), prompts_by_rank, k, max_new, 3)


def hybrid_zero3_diverse_beams(spreads, num_beams, num_groups, diversity, max_new, eos):
    """`diverse_beams_in_engine` with the hybrid model under ZeRO-3."""
    return diverse_beams_in_engine(hybrid_model(), spreads, num_beams, num_groups, diversity, max_new, eos, 3)
