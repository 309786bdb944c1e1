"""On instances small enough to enumerate every plan, the MILP planner finds the optimum and proves it."""

import random

import pytest

import solver
from hetsp.config import ClusterConfig, PlannerConfig
from solver.bounds import lower_bound
from solver.simulate import simulate

from .helpers import ToyCost, brute_force_optimum


def _cases():
    rng = random.Random(7)
    cases = []
    for k in range(10):
        n = rng.randint(1, 4)
        N = rng.randint(1, 4)
        cm = ToyCost(a=rng.choice([0.0, 1e-2, 5e-2]), c=rng.choice([0.0, 0.3, 2.0]), k=rng.choice([6, 10, 25]),
                     f=rng.choice([0.0, 0.5, 5.0]), overhead=rng.choice([0.0, 0.4]))
        lengths = [rng.randint(1, cm.k * N) for _ in range(n)]
        degrees = sorted(rng.sample(range(1, N + 1), rng.randint(1, N))) if rng.random() < 0.4 else []
        # every sequence must fit some allowed group
        allowed = degrees or list(range(1, N + 1))
        lengths = [min(s, cm.capacity(max(allowed))) for s in lengths]
        cases.append((lengths, N, cm, degrees))
    return cases


@pytest.mark.parametrize("lengths, num_ranks, cm, degrees", _cases())
def test_milp_matches_brute_force(lengths, num_ranks, cm, degrees):
    allowed = degrees or list(range(1, num_ranks + 1))
    opt = brute_force_optimum(lengths, cm, num_ranks, allowed)
    cfg = PlannerConfig(allowed_group_sizes=degrees, time_limit_s=20.0)
    plan = solver.get_planner("milp", cfg, ClusterConfig()).use_cost_model(cm).plan(lengths, num_ranks)
    got = simulate(plan, cm, num_ranks).total_s
    assert plan.meta["status"] == "optimal", plan.meta
    assert got == pytest.approx(opt, rel=1e-6, abs=1e-9)
    lb = lower_bound(lengths, cm, allowed, num_ranks)
    assert lb.total_s <= lb.tight_s <= opt + 1e-9
    greedy = solver.get_planner("greedy", cfg, ClusterConfig()).use_cost_model(cm).plan(lengths, num_ranks)
    assert simulate(greedy, cm, num_ranks).total_s >= opt - 1e-9
