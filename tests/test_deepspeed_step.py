"""Whole DeepSpeed steps under a random plan equal single-process AdamW on the whole batch.

AdamW's eps is raised to 1e-2 here: a first Adam step is g / (|g| + eps), which
amplifies the fp32 rounding of small gradients by up to lr / eps and would hide real errors
behind tolerance noise.
"""

import random

import pytest
import torch

from hetsp.config import ClusterConfig, PlannerConfig
from solver import get_planner

from . import step_fns
from .test_step_invariant import random_batch, reference


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_zero_step_matches_single_process_adamw(rank_pool, zero_stage):
    world = 3
    rng = random.Random(zero_stage)
    seqs = random_batch(rng, 6)
    plan = get_planner("random", PlannerConfig(seed=zero_stage), ClusterConfig()).plan([len(s) for s in seqs], world)
    (losses, params), = [r for r in rank_pool(world).run(step_fns.deepspeed_step, seqs, plan.to_json(), zero_stage) if r]

    ref_loss, ref_grads = reference(seqs, torch.float32)
    model = step_fns.tiny_model("sdpa", torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-2, weight_decay=0.0)
    for name, p in model.named_parameters():
        p.grad = ref_grads[name]
    opt.step()
    assert losses[0] == pytest.approx(ref_loss, rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
