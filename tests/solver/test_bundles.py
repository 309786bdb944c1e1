"""Bundles (the completions of one prompt) stay in one micro-batch under every planner."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import solver
from hetsp.config import ClusterConfig, PlannerConfig
from hetsp.plan import Group, MicroBatch, Plan, PlanError
from solver.base import PlanningError
from solver.simulate import simulate

from .helpers import ToyCost


@st.composite
def bundled_batches(draw):
    num_ranks = draw(st.integers(1, 8))
    k = draw(st.integers(8, 64))
    sizes = draw(st.lists(st.integers(2, 4), min_size=1, max_size=8))
    lengths, bundles = [], []
    for size in sizes:
        b = []
        for _ in range(size):
            b.append(len(lengths))
            lengths.append(draw(st.integers(1, k // size)))  # a bundle fits one rank (static uses groups of 1)
        bundles.append(b)
    singles = draw(st.integers(0, 5))
    lengths += [draw(st.integers(1, k)) for _ in range(singles)]
    perm = draw(st.permutations(range(len(lengths))))  # bundles need not be contiguous
    lengths = [lengths[perm.index(i)] for i in range(len(lengths))]
    bundles = [[perm[s] for s in b] for b in bundles]
    cm = ToyCost(a=draw(st.sampled_from([0.0, 1e-3])), c=draw(st.sampled_from([0.0, 0.1])), k=k, f=0.3)
    name = draw(st.sampled_from(["static", "random", "greedy", "milp", "batch_adaptive"]))
    return num_ranks, lengths, bundles, cm, name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bundled_batches())
def test_every_planner_keeps_bundles_in_one_micro_batch(inst):
    num_ranks, lengths, bundles, cm, name = inst
    cfg = PlannerConfig(name=name, group_size=1, time_limit_s=0.3, seed=len(lengths))
    p = solver.get_planner(name, cfg, ClusterConfig(tokens_per_rank=cm.k)).use_cost_model(cm)
    plan = p.plan(lengths, num_ranks, bundles).validate(num_ranks)
    assert sorted(map(sorted, plan.bundles)) == sorted(map(sorted, bundles))
    mb_of = {s: m for m, mb in enumerate(plan.micro_batches) for s in mb.seqs()}
    for b in bundles:
        assert len({mb_of[s] for s in b}) == 1, (b, plan.to_json())
    assert sorted(mb_of) == list(range(len(lengths)))
    if name != "random":
        for g in plan.groups():
            assert g.num_tokens(plan.lengths) <= (cm.capacity(g.size) if name != "static" else cm.k * g.size)
    assert simulate(plan, cm, num_ranks).total_s > 0


def test_random_planner_splits_bundles_over_groups():
    lengths = [5] * 40
    bundles = [list(range(i, i + 4)) for i in range(0, 40, 4)]
    plan = solver.get_planner("random", PlannerConfig(seed=3), ClusterConfig()).plan(lengths, 4, bundles)
    group_of = {s: (m, g.start) for m, mb in enumerate(plan.micro_batches) for g in mb.groups for s in g.seqs}
    assert any(len({group_of[s] for s in b}) > 1 for b in bundles)


def test_split_bundle_is_refused_by_plan_simulator_and_executor_check():
    plan = Plan((3, 3), (MicroBatch((Group(0, 1, (0,)),)), MicroBatch((Group(0, 1, (1,)),))), bundles=((0, 1),))
    with pytest.raises(PlanError, match="split over micro-batches"):
        plan.validate(1)
    with pytest.raises(PlanError, match="split over micro-batches"):
        simulate(plan, ToyCost())
    with pytest.raises(PlanError, match="split"):
        Plan(plan.lengths, plan.micro_batches).check_bundle_placement([[0, 1]])
    assert Plan.from_json(plan.to_json()).bundles == ((0, 1),)


def test_bad_bundles_and_too_large_bundles():
    p = solver.get_planner("static", PlannerConfig(group_size=1), ClusterConfig(tokens_per_rank=10))
    with pytest.raises(PlanningError, match="sequence 1 is in bundles"):
        p.plan([3, 3, 3], 1, [[0, 1], [1, 2]])
    with pytest.raises(PlanningError, match="outside the batch"):
        p.plan([3, 3, 3], 1, [[0, 5]])
    with pytest.raises(PlanningError, match=r"bundle \[0, 1\] has 12 tokens"):
        p.plan([6, 6, 3], 1, [[0, 1]])
    drop = solver.get_planner("static", PlannerConfig(group_size=1, long_policy="drop"), ClusterConfig(tokens_per_rank=10))
    plan = drop.plan([6, 6, 3, 2, 2], 1, [[0, 1], [3, 4]])
    assert plan.dropped == (0, 1) and plan.source_index == (2, 3, 4) and plan.num_inputs == 5
    assert plan.bundles == ((1, 2),) and plan.lengths == (3, 2, 2)


def test_cli_shows_bundles(tmp_path, capsys):
    from solver.__main__ import main

    f = tmp_path / "lengths.txt"
    f.write_text("\n".join(map(str, [300, 500, 200, 900, 120, 400])))
    cfg = tmp_path / "c.toml"
    cfg.write_text('[cluster]\npeak_tflops = 1.0\ntokens_per_rank = 1000\n[planner]\nname = "greedy"\n')
    assert main(["--lengths", str(f), "--ranks", "2", "--bundle-size", "3", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "2 bundles" in out and "b0" in out and "b1" in out
