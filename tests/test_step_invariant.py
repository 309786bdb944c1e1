"""The invariant: a plan changes speed, never math.

For random valid plans on 1 to 4 ranks (groups of every size, idle ranks,
empty groups, sequences shorter than their group), one step's loss and every
parameter gradient equal those of one process computing the whole global
batch with stock attention, one sequence at a time.
"""

import random

import pytest
import torch

from hetsp.config import ClusterConfig, PlannerConfig
from hetsp.objectives.lm import LanguageModeling
from solver import get_planner

from . import step_fns


def random_batch(rng: random.Random, n_max: int = 7):
    n = rng.randint(1, n_max)
    lengths = [rng.choice([1, 2, 3, rng.randint(4, 40)]) for _ in range(n)]
    if all(x == 1 for x in lengths):
        lengths[0] = 5
    return [[rng.randrange(step_fns.VOCAB) for _ in range(n)] for n in lengths]


def reference(sequences, dtype, attn="sdpa"):
    """Loss (mean over target tokens) and gradients of the whole batch in one process."""
    model = step_fns.tiny_model(attn, dtype)
    lm = LanguageModeling()
    units = lm.num_units([len(s) for s in sequences])
    total = 0.0
    for seq in sequences:
        ids = torch.tensor([seq])
        logits = model(input_ids=ids).logits[0]
        loss = lm.loss_sum(logits, torch.tensor(lm.labels(seq))) / units
        loss.backward()
        total += loss.item()
    return total, {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def assert_match_fp64_reference(cases, results):
    for (seqs, plan_json), (loss, grads) in zip(cases, results):
        ref_loss, ref_grads = reference(seqs, torch.float64)
        assert loss == pytest.approx(ref_loss, rel=1e-10), plan_json
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name} {plan_json}: {m}")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_random_plans_match_single_process(rank_pool, world):
    rng = random.Random(world)
    planner = get_planner("random", PlannerConfig(seed=world), ClusterConfig())
    cases = []
    for _ in range(4):
        seqs = random_batch(rng)
        cases.append((seqs, planner.plan([len(s) for s in seqs], world).to_json()))
    results = rank_pool(world).run(step_fns.plan_step, cases, "reference", torch.float64)[0]
    assert_match_fp64_reference(cases, results)


def test_activation_checkpointing_keeps_the_invariant(rank_pool):
    rng = random.Random(11)
    cases = []
    for seed in range(2):
        seqs = random_batch(rng, 6)
        plan = get_planner("random", PlannerConfig(seed=seed), ClusterConfig()).plan([len(s) for s in seqs], 4)
        cases.append((seqs, plan.to_json()))
    results = rank_pool(4).run(step_fns.plan_step, cases, "reference", torch.float64, True)[0]
    assert_match_fp64_reference(cases, results)


def test_fp32_default_kernel_matches(rank_pool):
    rng = random.Random(7)
    seqs = random_batch(rng, 6)
    plan = get_planner("random", PlannerConfig(seed=3), ClusterConfig()).plan([len(s) for s in seqs], 4)
    (loss, grads), = rank_pool(4).run(step_fns.plan_step, [(seqs, plan.to_json())], "auto", torch.float32)[0]
    ref_loss, ref_grads = reference(seqs, torch.float32)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)
