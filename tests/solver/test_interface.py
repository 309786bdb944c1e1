"""The planner interface, and the `static` and `random` planners."""

import subprocess
import sys

import pytest

import solver
from hetsp.config import ClusterConfig, ModelConfig, PlannerConfig
from hetsp.plan import Group, MicroBatch, Plan, PlanError


def test_import_is_light():
    code = "import solver, sys; assert 'torch' not in sys.modules and 'pulp' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_names_and_unknown():
    assert {"static", "random", "milp", "greedy", "batch_adaptive"} <= set(solver.planner_names())
    with pytest.raises(ValueError, match="unknown planner 'nope'"):
        solver.get_planner("nope", PlannerConfig(), ClusterConfig())


def test_static_packs_by_best_fit():
    p = solver.get_planner("static", PlannerConfig(group_size=2), ClusterConfig(tokens_per_rank=50))
    plan = p.plan([5, 3, 7, 100, 2], 4)
    assert isinstance(plan, Plan)
    assert plan.meta["planner"] == "static" and plan.meta["status"] and plan.meta["solve_s"] >= 0
    assert "est_time_s" in plan.meta
    # budget 100 per group: [100] alone, the rest together; two groups of 2 form one micro-batch
    assert plan.num_micro_batches == 1
    groups = plan.micro_batches[0].groups
    assert [(g.start, g.size) for g in groups] == [(0, 2), (2, 2)]
    assert sorted(map(sorted, (g.seqs for g in groups))) == [[0, 1, 2, 4], [3]]


def test_static_micro_batches_and_budget():
    p = solver.get_planner("static", PlannerConfig(group_size=1), ClusterConfig(tokens_per_rank=10))
    plan = p.plan([10] * 5, 2)
    assert plan.num_micro_batches == 3
    for g in plan.groups():
        assert g.num_tokens(plan.lengths) <= 10


def test_static_planner_is_the_static_baseline():
    """Training's static planner and the static baseline of hetsp-plan / the benchmark are one
    algorithm with one budget (the cost model's capacity x fill)."""
    from solver.baselines import static_packing
    from solver.table import CostTable

    cl = ClusterConfig(tokens_per_rank=60, peak_tflops=100.0)
    lengths = [5, 3, 7, 100, 2, 45, 61, 8, 19, 33]
    for d, fill in ((2, 1.0), (2, 0.9), (4, 0.9), (1, 1.0)):
        cfg = PlannerConfig(group_size=d, options={"fill": fill})
        planner = solver.get_planner("static", cfg, cl, ModelConfig())
        if max(lengths) > 60 * d:
            continue
        plan = planner.plan(lengths, 4)
        mbs = static_packing(CostTable(lengths, [d], planner.cost_model(4)), 4, d, fill)
        assert [sorted(sorted(g.seqs) for g in mb.groups) for mb in plan.micro_batches] == [
            sorted(sorted(g.seqs) for g in mb.groups) for mb in mbs
        ], (d, fill)


@pytest.mark.parametrize("d, msg", [(3, "does not divide"), (8, "larger than"), (0, ">= 1")])
def test_static_bad_group_size(d, msg):
    p = solver.get_planner("static", PlannerConfig(group_size=d), ClusterConfig())
    with pytest.raises(ValueError, match=msg):
        p.plan([5], 4)


def test_static_too_long_errors_or_drops():
    cl = ClusterConfig(tokens_per_rank=10)
    p = solver.get_planner("static", PlannerConfig(group_size=2), cl)
    with pytest.raises(ValueError, match=r"sequence 1 has 25 tokens.*longest that fits.* is 20"):
        p.plan([5, 25, 3], 4)
    p = solver.get_planner("static", PlannerConfig(group_size=2, long_policy="drop"), cl)
    plan = p.plan([5, 25, 3], 4)
    assert plan.lengths == (5, 3)
    assert plan.dropped == (1,) and plan.source_index == (0, 2) and plan.num_inputs == 3
    again = Plan.from_json(plan.to_json()).validate(4)  # part of the plan's data, not of meta
    assert again == plan and again.dropped == (1,) and "source_index" not in plan.meta
    assert plan.inputs_trained(["a", "b", "c"]) == ["a", "c"]
    with pytest.raises(PlanError, match="batch of 3 sequences"):
        plan.inputs_trained(["a", "c"])


def test_plan_source_index_is_validated():
    mb = MicroBatch((Group(0, 1, (0, 1)),))
    with pytest.raises(PlanError, match="together"):
        Plan((3, 4), (mb,), {}, (0, 2), None)
    with pytest.raises(PlanError, match="increase strictly"):
        Plan((3, 4), (mb,), {}, (2, 0), 3).validate(1)
    with pytest.raises(PlanError, match=r"inside \[0, 2\)"):
        Plan((3, 4), (mb,), {}, (0, 2), 2).validate(1)
    with pytest.raises(PlanError, match="1 entries for 2"):
        Plan((3, 4), (mb,), {}, (0,), 3).validate(1)


@pytest.mark.parametrize("lengths, msg", [([], "empty batch"), ([3, 0], "sequence 1 has length 0"), ([-2], "length -2")])
def test_bad_lengths(lengths, msg):
    p = solver.get_planner("static", PlannerConfig(), ClusterConfig())
    with pytest.raises(ValueError, match=msg):
        p.plan(lengths, 2)


def test_random_is_deterministic_and_varied():
    cl = ClusterConfig()
    sizes, num_mbs, idle, empty = set(), set(), False, False
    for seed in range(40):
        p = solver.get_planner("random", PlannerConfig(seed=seed), cl)
        lengths = [7, 1, 30, 4, 4, 9]
        a, b = p.plan(lengths, 4), p.plan(lengths, 4)
        assert a == b
        a.validate(4)
        num_mbs.add(a.num_micro_batches)
        for mb in a.micro_batches:
            idle |= any(mb.group_of(r) is None for r in range(4))
            for g in mb.groups:
                sizes.add(g.size)
                empty |= not g.seqs
    assert {1, 3} <= sizes and len(num_mbs) > 1 and idle and empty
