"""Rank functions for tests/test_sequencematch_noise.py: wrong tokens drawn from the model under
hetsp's plans (the training loop's recorder is `sm_train_fns.run_train_noise`)."""

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

