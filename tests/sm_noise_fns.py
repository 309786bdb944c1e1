"""Rank functions for tests/test_sequencematch_noise.py: wrong tokens drawn from the model under
hetsp's plans, and the training loop with noise_source = "model"."""

from __future__ import annotations

import torch.distributed as dist


def draws_under_plans(batch, plan_jsons, family, model_kwargs, objective, num_real):
    """For each plan: the batch's ids after `draw_noise_from_model` with an fp64 model (ring attention,
    SSM layers parallelised), on this rank."""
    import torch

    from hetsp.attention import register_attention
    from hetsp.data.noise import draw_noise_from_model
    from hetsp.executor import PlainEngine
    from hetsp.plan import Plan
    from hetsp.ssm_parallel import parallelize

    from .backspace_fns import _model

    rank, world = dist.get_rank(), dist.get_world_size()
    model = parallelize(_model(family, model_kwargs, register_attention()))
    out = []
    for plan_json in plan_jsons:
        plan = Plan.from_json(plan_json).validate(world)
        filled = draw_noise_from_model(PlainEngine(model), plan, batch, rank, world, torch.device("cpu"), objective,
                                       "torch_cpu", num_real)
        out.append([list(s) for s in filled])
    return out


def run_train_noise(cfg_dict: dict, resume: bool = False):
    """`train_fns.run_train`, recording on rank 0 every trained data sequence's injected wrong tokens
    as (wrong token, the target it was inserted before) and whether placeholders were left."""
    import hetsp.executor as executor

    from . import train_fns

    seen = []
    original = executor.run_plan

    def recording(engine, plan, sequences, *args, **kwargs):
        if kwargs.get("train", True):
            for s in sequences:
                noise = getattr(s, "noise", None) or []
                seen.append(([(s[j], s[j + 2] if j + 2 < len(s) else None) for j, n in enumerate(noise) if n],
                             bool(getattr(s, "draws", None))))
        return original(engine, plan, sequences, *args, **kwargs)

    executor.run_plan = recording
    try:
        out = train_fns.run_train(cfg_dict, resume)
    finally:
        executor.run_plan = original
    return None if dist.get_rank() != 0 else (*out, seen)
