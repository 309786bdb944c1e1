"""The training loop end to end inside a gloo world: resume exactness, plans recorded, loss falls."""

import copy
import json
import random
from pathlib import Path

import pytest

from hetsp.plan import Plan

from . import train_fns


def tiny_config(tmp_path: Path, name: str, planner: str = "random", **train):
    docs = tmp_path / "docs.jsonl"
    if not docs.exists():
        rng = random.Random(0)
        words = ["alpha", "beta", "gamma", "delta", "ring", "plan", "rank", "token"]
        with docs.open("w") as f:
            for i in range(60):
                n = rng.choice([2, 5, 20, 60])
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n")
    cfg = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 3},
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64,
                  "max_position_embeddings": 512},
        "data": {"dataset": str(docs), "max_seq_len": 96, "tokens_per_batch": 400, "validation_fraction": 0.1},
        "cluster": {"tokens_per_rank": 256},
        "planner": {"name": planner, "group_size": 1},
        "train": {"steps": 6, "lr": 3e-3, "warmup_steps": 2, "eval_every": 3, "eval_batches": 1,
                  "checkpoint_every": 0, "zero_stage": 2},
    }
    cfg["train"].update(train)
    return cfg


def test_resume_continues_exactly(rank_pool, tmp_path):
    pool = rank_pool(3)
    straight = tiny_config(tmp_path, "straight")
    _, full = [r for r in pool.run(train_fns.run_train, straight) if r][0]
    first = tiny_config(tmp_path, "resumed", stop_after=3)
    pool.run(train_fns.run_train, first)
    second = copy.deepcopy(first)
    second["train"]["stop_after"] = 0
    start, resumed = [r for r in pool.run(train_fns.run_train, second, True) if r][0]
    assert start == 3
    losses_full = [r["loss"] for r in full if "loss" in r]
    losses_resumed = [r["loss"] for r in resumed if "loss" in r]
    assert len(losses_full) == len(losses_resumed) == 6
    # resuming restores the same state and data order: the same sums in the same order give the
    # same losses up to DeepSpeed's reduction order (rel 1e-6 on losses ~5; abs for safety)
    assert losses_resumed == pytest.approx(losses_full, rel=1e-6, abs=1e-7)
    # the loss falls: a tiny model on a small corpus drops about 0.6 nats in 6 steps (seeded);
    # the validation batches are the same at every evaluation
    assert sum(losses_full[-3:]) / 3 < sum(losses_full[:3]) / 3 - 0.2, losses_full
    train_records = [r for r in full if r.get("kind") == "train"]
    # comm_s (time blocked in exchanges) and data_s (building batches) are written at every step
    assert all(r["comm_s"] >= 0 and r["data_s"] > 0 for r in train_records), train_records
    vals = [r["val_loss"] for r in full if r.get("kind") == "eval"]
    assert len(vals) == 2 and vals[1] < vals[0] - 0.1, vals
    plans = (tmp_path / "runs" / "resumed" / "plans.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in plans]
    assert steps == list(range(6))
    Plan.from_dict(json.loads(plans[0])["plan"]).validate(3)


def test_a_torchrun_restart_resumes_by_itself(rank_pool, tmp_path):
    """torchrun sets TORCHELASTIC_RESTART_COUNT > 0 on a restarted attempt: no --resume needed."""
    pool = rank_pool(2)
    cfg = tiny_config(tmp_path, "restarted", planner="static", steps=4, stop_after=2, eval_every=0)
    pool.run(train_fns.run_train, cfg)
    cfg["train"]["stop_after"] = 0
    start, records = [r for r in pool.run(train_fns.run_train, cfg, False, {"TORCHELASTIC_RESTART_COUNT": "1"}) if r][0]
    assert start == 2
    assert [r["step"] for r in records if r.get("kind", "train") == "train"] == [0, 1, 2, 3]
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "restarted" / "checkpoints").glob("step*") if p.is_dir())
    assert ckpts == ["step00000002"]  # written at the early stop; checkpoint_every = 0 writes no other


def test_profile_cuts_its_sequences_from_the_jobs_batches():
    """The profiler's sequences are the job's own tokens (a model's cost can depend on what it reads):
    the batches from `first_step` on, concatenated, until there are enough."""
    from hetsp.profiler import job_tokens

    class Data:
        def train_batch(self, step):
            return [[step, 10 * step], [100 + step]]

    class Objective:
        @staticmethod
        def tokens(seq):
            return seq

    assert job_tokens(Data(), Objective(), 4, 5) == [4, 40, 104, 5, 50, 105]


def test_profile_writes_a_cost_table_the_planner_uses(rank_pool, tmp_path):
    from hetsp.config import config_from_dict
    from hetsp.planning import make_planner

    out = tmp_path / "profile.json"
    cfg = tiny_config(tmp_path, "profiled", planner="milp")
    rank_pool(2).run(train_fns.run_profile, cfg, str(out))
    data = json.loads(out.read_text())
    assert data["format"] == "hetsp-profile-v1" and data["fixed_s"] >= 0
    assert {(p["degree"], p["tokens"]) for p in data["points"]} == {(1, 96), (2, 96)}  # max_seq_len 96 < 128
    assert all(p["time_s"] > 0 for p in data["points"])
    # the fixed costs it separates: per group size, per step; and where it was measured
    assert set(data["group_overhead_s"]) == {"1", "2"} and all(t >= 0 for t in data["group_overhead_s"].values())
    assert data.get("step_s", 0.0) >= 0 and data["max_seq_len"] == 96
    assert {"cpu", "cores", "torch", "device"} <= set(data["hardware"])
    # the ranks it was measured with (the cores they shared), and the model measured after the job's first steps
    from hetsp.profiler import warmup_steps

    assert data["world"] == 2 and data["trained_steps"] == warmup_steps(cfg["train"]["steps"]) > 0
    cfg["planner"].update(cost_model="profile", profile_path=str(out))
    planner = make_planner(config_from_dict(cfg), 259)
    plan = planner.plan([90, 3, 40, 7], 2)
    assert plan.meta["est_time_s"] is not None and plan.validate(2)
    from hetsp.planning import profile_hardware_note

    assert profile_hardware_note(planner, 2) is None  # measured here


def test_profile_runs_the_objectives_hooks(rank_pool, tmp_path):
    """The profiler's first training steps run as training does, objective hooks included: CoPG with a
    precomputed reference (log-probs attached by `prepare_run`, cached in the run folder as in
    training) and SequenceMatch with wrong tokens drawn from the model (`step_batch`) both profile."""
    from .test_copg_train import copg_config
    from .test_sequencematch_train import sm_config

    copg = copg_config(tmp_path, "copg_profiled", reference="precomputed")
    sm = sm_config(tmp_path, "sm_profiled", steps=4)
    sm["objective"].update(noise_source="model", sample_every=0, w_data=1.0)
    for cfg in (copg, sm):
        out = tmp_path / f"{cfg['run']['name']}.json"
        # a job planned with the table being written: the warm-up's plans must not need it
        cfg["planner"] = {"name": "milp", "cost_model": "profile", "profile_path": str(out)}
        rank_pool(2).run(train_fns.run_profile, cfg, str(out))
        data = json.loads(out.read_text())
        assert data["trained_steps"] > 0 and all(p["time_s"] > 0 for p in data["points"])
    cached = list((tmp_path / "runs" / "copg_profiled" / "reference").glob("*.json"))
    assert len(cached) == 1  # the reference the training run will read from the cache
