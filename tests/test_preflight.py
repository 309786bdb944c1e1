"""A config that cannot run on the world it is given fails before training, with the fix in the message;
the dry run prints model size, memory and plans without GPUs or a process group."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetsp.config import load_config
from hetsp.memory import MemoryModel
from hetsp.preflight import check_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["planner.name='static'", "planner.group_size=3"], 4, "group_size=3 does not divide"),
        (["cluster.ranks_per_node=3"], 4, "ranks_per_node=3 does not divide"),
        (["planner.allowed_group_sizes=[1, 8]"], 4, r"sizes \[8\] outside 1..4"),
        (["data.max_seq_len=9000", "cluster.tokens_per_rank=1024"], 4, "exceeds what all 4 ranks can hold"),
    ],
)
def test_world_that_does_not_fit_the_config(overrides, world, message):
    cfg = load_config(ROOT / "configs" / "default.toml", overrides)
    with pytest.raises(ValueError, match=message):
        check_world(cfg, world)


def test_default_configs_fit_their_worlds():
    check_world(load_config(ROOT / "configs" / "default.toml"), 4)
    check_world(load_config(ROOT / "configs" / "llama7b_128k_64gpu.toml"), 64)


def _memory(stage, dtype="bf16", ckpt=False):
    return MemoryModel(10**9, 32, 4096, 1024, 11008, 32000, stage, 64, dtype, ckpt)


def test_model_state_memory_shrinks_with_zero_stage():
    per_stage = [_memory(s).state_bytes_per_rank() for s in (0, 1, 2, 3)]
    assert per_stage[0] > per_stage[1] > per_stage[2] > per_stage[3]
    assert per_stage[3] == pytest.approx(16e9 / 64)  # bf16 weights + grads, fp32 master + 2 moments
    assert _memory(3, "fp32").state_bytes_per_rank() == pytest.approx(16e9 / 64)  # fp32: 4 + 4 + 8
    assert _memory(1, "fp32").activation_bytes_per_token() > _memory(1, "bf16").activation_bytes_per_token()
    assert _memory(1, ckpt=True).activation_bytes_per_token() < _memory(1).activation_bytes_per_token()


def test_planner_capacity_is_the_memory_models():
    """One memory model: the ring cost model's token budget is `MemoryModel.tokens_per_rank` of the
    run's ZeRO stage, dtype and checkpointing (what the dry run prints)."""
    from hetsp.planning import make_planner

    cfg = load_config(ROOT / "configs" / "llama7b_128k_64gpu.toml")
    for overrides in ([], ["train.zero_stage=1"], ["train.activation_checkpointing=false"], ["train.dtype='fp32'"]):
        cfg = load_config(ROOT / "configs" / "llama7b_128k_64gpu.toml", overrides)
        cm = make_planner(cfg, 32000, on_gpu=True).cost_model(64)
        mem = MemoryModel.for_run(cfg.model, 32000, 64, cfg.train.zero_stage, cfg.train.dtype, cfg.train.activation_checkpointing)
        assert cm.tokens_per_rank == mem.tokens_per_rank(cfg.cluster.memory_per_rank_gb * 2**30), overrides
        assert cm.dtype == cfg.train.dtype


def test_dry_run_of_the_cluster_config_needs_no_gpu(tmp_path):
    env = dict(os.environ, WORLD_SIZE="64", RANK="0", HETSP_LOG_LEVEL="WARNING")
    cmd = [sys.executable, "-m", "hetsp.train", str(ROOT / "configs" / "llama7b_128k_64gpu.toml"), "--dry-run",
           "--set", "data.max_documents=300", "--set", "planner.time_limit_s=0.3", "--set", f"run.output_dir='{tmp_path}'"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "parameters" in out.stdout and "memory/rank" in out.stdout
    cfg = load_config(ROOT / "configs" / "llama7b_128k_64gpu.toml")
    mem = MemoryModel.for_run(cfg.model, 259, 64, cfg.train.zero_stage, "bf16", cfg.train.activation_checkpointing)  # bytes tokenizer
    assert f"tokens/rank  {mem.tokens_per_rank(cfg.cluster.memory_per_rank_gb * 2**30):,} fit" in out.stdout, out.stdout
    assert out.stdout.count("\nstep ") == 3
    # what a rank process holds besides model states and activations is counted too
    assert "process/rank libraries" in out.stdout and "+ data" in out.stdout and "DeepSpeed buffers" in out.stdout
    assert "total/rank" in out.stdout


@pytest.mark.parametrize("name", ["default.toml", "llama_small.toml"])
def test_shipped_configs_plan_a_long_tailed_batch(name):
    """The shipped CPU configs' planners (measured profile, analytic ring model) give valid plans
    within every group's token budget, with the longest sequences in groups of ranks."""
    from hetsp.planning import make_planner

    cfg = load_config(ROOT / "configs" / name)
    longest = cfg.data.max_seq_len
    assert longest > cfg.cluster.tokens_per_rank  # the longest sequences need a group
    lengths = [longest, longest // 2 + 1, 1500, 700, 300, 90, 12, 2]
    plan = make_planner(cfg, 259).plan(lengths, 4).validate(4)
    assert plan.meta["est_time_s"] is not None
    for g in plan.groups():
        assert g.num_tokens(lengths) <= cfg.cluster.tokens_per_rank * g.size
    assert max(g.size for g in plan.groups() if g.seqs) >= 2


def test_a_profile_from_other_hardware_is_named(tmp_path):
    """A run planning with a profile measured elsewhere is told so (the launcher logs it with the
    command that re-measures it); one measured here is not."""
    from hetsp.config import config_from_dict
    from hetsp.planning import make_planner, profile_hardware_note
    from solver.costs.profile import hardware_here, save_profile

    pts = [{"degree": d, "tokens": s, "time_s": s * 1e-4} for d in (1, 2) for s in (128, 256)]
    cfg = {"cluster": {"tokens_per_rank": 128}, "data": {"max_seq_len": 256},
           "planner": {"name": "greedy", "cost_model": "profile", "profile_path": str(tmp_path / "p.json")}}
    save_profile(tmp_path / "p.json", pts, 128, hardware=dict(hardware_here(), cpu="Another CPU", cores=96))
    note = profile_hardware_note(make_planner(config_from_dict(cfg), 259, on_gpu=False), 2)
    assert "measured on other hardware" in note and "'Another CPU' there" in note and "cores 96 there" in note
    save_profile(tmp_path / "p.json", pts, 128, hardware=hardware_here())
    assert profile_hardware_note(make_planner(config_from_dict(cfg), 259, on_gpu=False), 2) is None


def test_lora_settings_without_lora_rank_are_refused():
    """[lora] options with lora.r = 0 (no adapters) would be ignored: an error names the key."""
    from hetsp.checks import check_values
    from hetsp.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="lora.alpha is set but lora.r = 0"):
        check_values(config_from_dict({"lora": {"alpha": 8.0}}, "test"))
    check_values(config_from_dict({"lora": {"r": 4, "alpha": 8.0}}, "test"))
