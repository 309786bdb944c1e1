import subprocess
import sys

import pytest

from hetsp.config import ConfigError, config_to_toml, load_config
from hetsp.plan import Group, MicroBatch, Plan, PlanError
from hetsp.testing import RankError

from . import pool_fns


def test_plan_json_roundtrip_and_validate():
    plan = Plan((5, 3, 7), (MicroBatch((Group(0, 2, (0, 2)), Group(2, 1, ()))), MicroBatch((Group(1, 3, (1,)),))))
    plan.validate(4)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert plan.micro_batches[0].group_of(2) == Group(2, 1, ())
    assert plan.micro_batches[0].group_of(3) is None
    assert plan.group_sizes() == {2: 1, 3: 1}


@pytest.mark.parametrize(
    "plan, msg",
    [
        (Plan((5,), (MicroBatch((Group(0, 2, (0,)), Group(1, 1, ()))),)), "two groups"),
        (Plan((5, 2), (MicroBatch((Group(0, 2, (0,)),)),)), "in no group"),
        (Plan((5,), (MicroBatch((Group(0, 2, (0,)),)), MicroBatch((Group(0, 1, (0,)),)))), "twice"),
        (Plan((5,), (MicroBatch((Group(3, 2, (0,)),)),)), "outside"),
        (Plan((0,), (MicroBatch((Group(0, 1, (0,)),)),)), "at least 1 token"),
    ],
)
def test_plan_validate_rejects(plan, msg):
    with pytest.raises(PlanError, match=msg):
        plan.validate(4)


def test_config_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(p)
    p.write_text("[train]\nsteps = 'many'\n")
    with pytest.raises(ConfigError, match=r"train\.steps.*integer"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="one of"):
        load_config(None, ["data.long_policy=keep"])


def test_config_overrides_and_roundtrip(tmp_path):
    cfg = load_config(None, ["train.steps=7", "train.lr=1", "data.dataset=foo.jsonl", "model.extra={a = 1}"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.dataset == "foo.jsonl" and cfg.model.extra == {"a": 1}
    p = tmp_path / "again.toml"
    p.write_text(config_to_toml(cfg))
    assert load_config(p) == cfg


def test_light_modules_import_no_torch_or_pulp():
    code = "import sys, hetsp, hetsp.plan, hetsp.config; bad = [m for m in ('torch', 'pulp') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rank_pool_runs_and_reports_failures(rank_pool):
    pool = rank_pool(3)
    assert pool.run(pool_fns.rank_sum, 1) == [6.0, 6.0, 6.0]
    with pytest.raises(RankError, match="rank 1 failed"):
        pool.run(pool_fns.fail_on_rank, 1)
    assert pool.run(pool_fns.rank_sum, 0) == [3.0, 3.0, 3.0]
