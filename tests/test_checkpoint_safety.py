"""Checkpoints that cannot lose a run, and a planner whose failure or fallback is heard:
complete-or-invisible checkpoints, fallback to the previous complete one (said), a named
truncated file, missing RNG state as an error, another world size refused with the command
that works, planner failures on every rank, heuristic fallbacks counted, batches of only
too-long sequences skipped."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from hetsp import checkpoint
from hetsp.config import config_from_dict, config_to_toml

from . import safety_fns, train_fns
from .test_train_loop import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_run(rank_pool, tmp_path_factory):
    """A 2-rank run of 4 steps with checkpoints after steps 2 and 4, and its metrics."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(tmp, "run", planner="static", steps=4, checkpoint_every=2, keep_checkpoints=3, eval_every=0)
    _, records = [r for r in rank_pool(2).run(train_fns.run_train, cfg) if r][0]
    return tmp, cfg, records


def _copy(saved_run, name: str) -> tuple[Path, dict]:
    tmp, cfg, _ = saved_run
    run = tmp / "runs" / name
    shutil.copytree(tmp / "runs" / "run", run)
    return run, dict(cfg, run=dict(cfg["run"], name=name))


def _losses(records) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_a_checkpoint_is_visible_only_when_complete(saved_run):
    tmp, _, _ = saved_run
    ckpt = tmp / "runs" / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000002", "step00000004"]
    assert (ckpt / "latest").read_text() == "step00000004"
    meta = json.loads((ckpt / "step00000004" / "hetsp_meta.json").read_text())
    assert meta["world_size"] == 2 and {"rng_rank0.pt", "rng_rank1.pt"} <= set(meta["files"])
    for name, size in meta["files"].items():
        assert (ckpt / "step00000004" / name).stat().st_size == size
    assert checkpoint.problems(ckpt / "step00000004") == []


def test_interrupted_checkpoint_resumes_from_the_previous_one_with_a_message(rank_pool, saved_run):
    """What a crash between a checkpoint's files left with the old write order: the pointer moved,
    the meta not written; plus a half-written folder of the new order."""
    run, cfg = _copy(saved_run, "interrupted")
    (run / "checkpoints" / "step00000004" / "hetsp_meta.json").unlink()
    (run / "checkpoints" / ".partial" / "step00000006").mkdir(parents=True)
    found = checkpoint.find_resumable(run)
    assert found.step == 2
    text = "\n".join(found.notes)
    assert "step00000004 is incomplete" in text and "hetsp_meta.json is missing" in text
    assert ".partial/step00000006 is a checkpoint that was being written" in text
    assert "resuming from the previous complete checkpoint step00000002" in text
    start, records = [r for r in rank_pool(2).run(train_fns.run_train, cfg, True) if r][0]
    assert start == 2
    # the resumed steps repeat the original run's exactly (same data, state and RNG)
    assert _losses(records) == _losses(saved_run[2])


def test_truncated_model_state_is_named_and_skipped(saved_run):
    run, _ = _copy(saved_run, "truncated")
    states = sorted((run / "checkpoints" / "step00000004").glob("*model_states.pt"))
    assert states
    data = states[0].read_bytes()
    states[0].write_bytes(data[: len(data) // 2])
    found = checkpoint.find_resumable(run)
    assert found.step == 2
    assert any(str(states[0]) in n and "truncated" in n for n in found.notes), found.notes


def test_no_complete_checkpoint_is_an_error_not_a_fresh_start(saved_run):
    run, _ = _copy(saved_run, "broken")
    for tag in ("step00000002", "step00000004"):
        (run / "checkpoints" / tag / "rng_rank1.pt").unlink()  # a missing RNG state
    with pytest.raises(checkpoint.CheckpointError, match=r"no complete checkpoint .*rng_rank1.pt is missing"):
        checkpoint.find_resumable(run)


def test_other_world_size_is_refused_with_the_command_that_works(saved_run, tmp_path):
    run, cfg = _copy(saved_run, "resized")
    with pytest.raises(ValueError, match="written by 2 ranks but this job has 3.*hetsp-launch --simulate 2"):
        checkpoint.check_resumable(run, 3, relaunch=lambda n: f"hetsp-launch --simulate {n} c.toml --resume")
    checkpoint.check_resumable(run, 2)
    # and from the launcher, before any rank starts
    toml = tmp_path / "resized.toml"
    toml.write_text(config_to_toml(config_from_dict(cfg)))
    import subprocess

    r = subprocess.run([sys.executable, "-m", "launcher", "--module", "tests.launch_targets.sleep_forever",
                        "--device", "cpu", "--simulate", "3", str(toml), "--resume"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "written by 2 ranks but this job has 3" in r.stderr
    assert f"hetsp-launch --simulate 2 {toml} --resume" in r.stderr and "simulating" not in r.stderr


# ----------------------------------------------------------------------------- planning


def _planner_cfg(**planner) -> dict:
    return {"cluster": {"tokens_per_rank": 64, "peak_tflops": 100.0}, "planner": planner}


def test_a_planner_failure_on_rank_0_reaches_every_rank(rank_pool):
    # a 100-token sequence cannot fit 2 ranks of 64 tokens with planner.long_policy = "error"
    results = rank_pool(2).run(safety_fns.plan_steps, _planner_cfg(name="static"), [100], 1, timeout=60)
    assert results[0][0] == "PlanningError" and "sequence 0 has 100 tokens" in results[0][1]
    assert results[1][0] == "PeerFailed"
    assert "the planner failed on rank 0 (step 0): PlanningError: sequence 0 has 100 tokens" in results[1][1]


def test_heuristic_fallbacks_are_counted_for_the_console(rank_pool):
    lengths = [50, 30, 20, 10, 5]
    rushed = rank_pool(2).run(safety_fns.plan_steps, _planner_cfg(name="milp", time_limit_s=0.01), lengths, 3)
    assert rushed[0][0] == "ok"
    assert "fell back to its heuristic plan for 3 of 3 batches" in rushed[0][1]
    assert "no time left for the MILP" in rushed[0][1]
    calm = rank_pool(2).run(safety_fns.plan_steps, _planner_cfg(name="milp", time_limit_s=20.0), lengths, 1)
    assert calm[0] == ("ok", None)


def test_a_batch_of_only_too_long_sequences_is_skipped(rank_pool, tmp_path):
    cfg = tiny_config(tmp_path, "drops", planner="static", steps=6, eval_every=0, checkpoint_every=0)
    cfg["data"].update(tokens_per_batch=96)
    cfg["cluster"]["tokens_per_rank"] = 64
    cfg["planner"]["long_policy"] = "drop"
    _, records = [r for r in rank_pool(2).run(train_fns.run_train, cfg) if r][0]
    plans = [json.loads(line) for line in (tmp_path / "runs" / "drops" / "plans.jsonl").read_text().splitlines()]
    skipped = [p["step"] for p in plans if not p["plan"]["lengths"]]
    trained = sorted(_losses(records))
    assert skipped, "the data should hold a batch of one sequence longer than 64 tokens"
    assert trained and sorted(skipped + trained) == list(range(6))
