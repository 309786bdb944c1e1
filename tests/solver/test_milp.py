"""MILP pieces: the CBC backend, the pooled count model, the ring model end to end, the size guard
that keeps a solve within its time limit."""

import random

import pytest

import solver
from hetsp.config import ClusterConfig, ModelConfig, PlannerConfig
from solver.milp_counts import solve_micro_batch_counts
from solver.simulate import simulate
from solver.table import CostTable

from .helpers import ToyCost, brute_force_optimum


def test_cbc_backend_proves_optimum():
    cm = ToyCost(a=1e-2, c=0.3, k=10, f=0.5)
    lengths = [12, 3, 30, 7]
    opt = brute_force_optimum(lengths, cm, 4, [1, 2, 3, 4])
    cfg = PlannerConfig(time_limit_s=30.0, options={"backend": "cbc"})
    plan = solver.get_planner("milp", cfg, ClusterConfig()).use_cost_model(cm).plan(lengths, 4)
    assert plan.meta["milp_backend"] == "cbc" and plan.meta["status"] == "optimal"
    assert simulate(plan, cm, 4).total_s == pytest.approx(opt)


def test_count_model_packs_a_micro_batch():
    rng = random.Random(3)
    cm = ToyCost(a=1e-4, c=0.05, k=8000, f=0.0)
    lengths = [rng.randint(10, 1500) for _ in range(60)]
    table = CostTable(lengths, [1, 2, 4, 8], cm)
    res = solve_micro_batch_counts(list(range(60)), table, 8, c_max=1e6, time_limit=5.0)
    assert res.status in ("optimal", "feasible") and res.micro_batch is not None
    mb = res.micro_batch
    assert sorted(i for g in mb.groups for i in g.seqs) == list(range(60))
    assert sum(g.d for g in mb.groups) <= 8
    for g in mb.groups:
        assert g.tokens <= cm.capacity(g.d)
    # the pooled model is a relaxation: the real makespan is at least its C, never below the fluid bound
    assert mb.makespan() >= res.bound - 1e-9
    assert mb.makespan() >= sum(table.min_rank_time(i) for i in range(60)) / 8 - 1e-9


def test_large_batch_gives_a_valid_plan_within_memory():
    """400 long-tailed sequences on 32 ranks under a short limit: a valid plan within memory,
    costed as the simulator costs it. (Nothing here is timed; the size guard below is what
    keeps the planner inside its limit.)"""
    rng = random.Random(5)
    lengths = [int(rng.paretovariate(1.1) * 300) + 1 for _ in range(400)]
    model = ModelConfig(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=4, intermediate_size=5504, vocab_size=32000)
    cluster = ClusterConfig(ranks_per_node=8, peak_tflops=312, tokens_per_rank=8192)
    lengths = [min(s, 8192 * 32) for s in lengths]
    cfg = PlannerConfig(name="milp", cost_model="ring", time_limit_s=0.6)
    p = solver.get_planner("milp", cfg, cluster, model)
    plan = p.plan(lengths, 32)
    plan.validate(32)
    for g in plan.groups():
        assert g.num_tokens(plan.lengths) <= 8192 * g.size
    assert plan.meta["status"] in ("heuristic", "time_limit")
    assert plan.meta["est_time_s"] > 0
    # the heuristic and the planner agree on the cost model's view of the step
    assert plan.meta["est_time_s"] == pytest.approx(simulate(plan, p.cost_model(32), 32).total_s)


def test_a_model_too_large_for_the_time_left_is_not_built():
    """The deterministic part of the time limit: an exact model whose estimated size exceeds
    what PuLP builds in the time left (max_vars_per_s x seconds left) is skipped, the heuristic
    plan is returned and meta says why."""
    cm = ToyCost(a=1e-2, c=0.3, k=10, f=0.5)
    cfg = PlannerConfig(time_limit_s=5.0, options={"max_vars_per_s": 1})
    plan = solver.get_planner("milp", cfg, ClusterConfig()).use_cost_model(cm).plan([12, 3, 30, 7], 4)
    plan.validate(4)
    assert plan.meta["status"] == "heuristic" or plan.meta.get("count_milp_tried", 0) > 0
    assert "exact MILP skipped" in plan.meta["fallback"] and "raise planner.time_limit_s" in plan.meta["fallback"]
    assert "milp_status" not in plan.meta  # no exact model was solved
