"""FlexSP's own setting: the static baseline and the lower bound reproduce the published figures,
and the planner's plans are no slower than FlexSP's (quality, not timing)."""

import pytest

import solver
from hetsp.config import ClusterConfig, PlannerConfig
from solver.baselines import static_packing
from solver.bounds import lower_bound
from solver.costs.flexsp import FlexSPCostModel
from solver.flexsp_setting import DEGREES, NUM_RANKS, PUBLISHED, STATIC_FILL, flexsp_batches
from solver.pack import plan_cost
from solver.simulate import simulate
from solver.table import CostTable

from .helpers import WIKIPEDIA

pytestmark = pytest.mark.skipif(not WIKIPEDIA.exists(), reason=f"{WIKIPEDIA} not present")


@pytest.fixture(scope="module")
def batches():
    return flexsp_batches(WIKIPEDIA)


@pytest.mark.parametrize("model", ["7b", "13b", "30b"])
def test_static_and_bound_reproduce(batches, model):
    cm = FlexSPCostModel(model, NUM_RANKS, 30.0)
    static = sum(plan_cost(static_packing(CostTable(b, DEGREES, cm), NUM_RANKS, 64, STATIC_FILL), cm.fixed_s) for b in batches)
    bound = sum(lower_bound(b, cm, DEGREES, NUM_RANKS).total_s for b in batches)
    assert static == pytest.approx(PUBLISHED[model]["static_s"], abs=0.006)
    assert bound == pytest.approx(PUBLISHED[model]["lower_bound_s"], abs=0.006)


def test_greedy_beats_flexsp_7b(batches):
    cfg = PlannerConfig(cost_model="flexsp", flexsp_model="7b", allowed_group_sizes=DEGREES, time_limit_s=0.5)
    p = solver.get_planner("greedy", cfg, ClusterConfig(memory_per_rank_gb=30.0, ranks_per_node=8))
    cm = p.cost_model(NUM_RANKS)
    total = 0.0
    for b in batches:
        plan = p.plan(b, NUM_RANKS)
        total += simulate(plan, cm, NUM_RANKS).total_s
    assert total <= PUBLISHED["7b"]["flexsp_total_s"]
