"""Property tests: every planner returns a valid plan that respects memory, for random batches and clusters."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import solver
from hetsp.config import ClusterConfig, PlannerConfig
from solver.costs.flexsp import FlexSPCostModel
from solver.simulate import simulate

from .helpers import ToyCost


@st.composite
def instances(draw):
    num_ranks = draw(st.integers(1, 24))
    rpn = draw(st.sampled_from([0] + [d for d in (1, 2, 4, 8) if d <= num_ranks]))
    k = draw(st.integers(4, 64))
    sizes = draw(st.one_of(st.just([]), st.lists(st.integers(1, num_ranks), min_size=1, max_size=5, unique=True)))
    largest = max(sizes) if sizes else num_ranks
    lengths = draw(st.lists(st.integers(1, k * largest), min_size=1, max_size=40))
    cm = ToyCost(a=draw(st.sampled_from([0.0, 1e-3, 1e-2])), c=draw(st.sampled_from([0.0, 0.1, 1.0])), k=k,
                 f=draw(st.sampled_from([0.0, 0.3])), overhead=draw(st.sampled_from([0.0, 0.05])))
    name = draw(st.sampled_from(["greedy", "milp", "batch_adaptive"]))
    return num_ranks, rpn, sizes, lengths, cm, name


def _check_memory(plan, cm):
    for g in plan.groups():
        assert g.num_tokens(plan.lengths) <= cm.capacity(g.size)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_plans_valid_and_fit_memory(inst):
    num_ranks, rpn, sizes, lengths, cm, name = inst
    cfg = PlannerConfig(allowed_group_sizes=sizes, time_limit_s=0.3)
    p = solver.get_planner(name, cfg, ClusterConfig(ranks_per_node=rpn)).use_cost_model(cm)
    plan = p.plan(lengths, num_ranks)
    plan.validate(num_ranks)
    assert sorted(plan.lengths) == sorted(lengths)
    _check_memory(plan, cm)
    allowed = set(sizes or range(1, num_ranks + 1))
    assert all(g.size in allowed for g in plan.groups())
    assert plan.meta["est_time_s"] == simulate(plan, cm, num_ranks).total_s


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(1, 5000), min_size=1, max_size=30),
    st.integers(1, 6),
    st.integers(1, 40),
    st.integers(0, 2**31),
)
def test_static_and_random_valid(lengths, num_ranks, tokens_per_rank, seed):
    cl = ClusterConfig(tokens_per_rank=tokens_per_rank)
    plan = solver.get_planner("random", PlannerConfig(seed=seed), cl).plan(lengths, num_ranks)
    plan.validate(num_ranks)
    d = num_ranks
    static = solver.get_planner("static", PlannerConfig(group_size=d, long_policy="drop"), cl)
    if min(lengths) > tokens_per_rank * d:
        return
    plan = static.plan(lengths, num_ranks)
    plan.validate(num_ranks)
    assert plan.inputs_trained(lengths) == list(plan.lengths)
    assert all(lengths[i] > tokens_per_rank * d for i in plan.dropped)
    for g in plan.groups():
        assert g.num_tokens(plan.lengths) <= tokens_per_rank * d


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(1, 200_000), min_size=1, max_size=60), st.sampled_from([8, 64, 256]))
def test_flexsp_model_plans_fit(lengths, num_ranks):
    cm = FlexSPCostModel("7b", num_ranks, 30.0)
    lengths = [min(s, cm.capacity(num_ranks)) for s in lengths]
    plan = solver.get_planner("greedy", PlannerConfig(time_limit_s=0.2), ClusterConfig(ranks_per_node=8)).use_cost_model(cm).plan(lengths, num_ranks)
    _check_memory(plan, cm)
