"""What the launcher guarantees before and around the ranks: every config error exits 2 before
any rank starts, one run per run folder, a stopped rank is named and the job stopped, a host
that cannot hold the ranks is refused. Rank programs live in tests/launch_targets/."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import launcher.__main__ as launcher_main
from hetsp import checks
from hetsp.config import load_config
from hetsp.overhead import _cache_file, _versions_key, host_problems
from hetsp.runlock import LOCK_NAME, RunFolderBusy, RunLock

from .test_launcher import ROOT, TARGETS, _env, _launcher_argv, _read_lines, launch

DEFAULT = str(ROOT / "configs" / "default.toml")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f"[run]\noutput_dir = {json.dumps(str(tmp_path / 'runs'))}\n[train]\nsteps = 1\n")
    return path


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "planner.name=milpp"], "planner.name must be one of"),
        (["--set", "planner.cost_model=profiled"], "planner.cost_model must be one of"),
        (["--set", "attention.kernel=flash"], "attention.kernel must be one of"),
        (["--set", "train.objective=lmm"], "train.objective must be one of"),
        (["--set", "planner.profile_path=no/such/profile.json"], "planner.profile_path = 'no/such/profile.json': no such"),
        (["--set", "planner.allowed_group_sizes=[1]"], "data.max_seq_len = 2048 but planner 'milp' places at most 1024"),
        (["--simulate", "3"], "cluster.ranks_per_node=4 does not divide the world of 3 ranks"),
        (["--simulate", "2"], "cluster.ranks_per_node=4 does not divide the world of 2 ranks"),
        (["--set", "train.steps=-5"], "train.steps = -5: must be >= 0"),
        (["--set", "planner.options.num_bucket=8"], "planner.options.num_bucket is not an option of planner 'milp'"),
        (["--set", "planner.options.backend=\"glpk\""], "planner.options.backend must be one of ['highs', 'cbc']"),
        (["--set", "run.heartbeat_timeout_s=900"], "must be below run.dist_timeout_s"),
        (["--set", "planner.cost_model=\"ring\""], "planner 'milp' chooses plans by time: the ring cost model needs "
                                                    "cluster.peak_tflops"),
    ],
)
def test_config_errors_exit_2_before_any_rank_starts(capsys, args, expected):
    # the rank program would sleep forever: had a rank started, the test would hang
    argv = ["--module", f"{TARGETS}.sleep_forever", DEFAULT, *args]
    if "--simulate" not in args:
        argv += ["--simulate", "4"]
    assert launcher_main.main(argv) == 2
    out, err = capsys.readouterr()
    assert expected in err, err
    assert out == "" and "simulating" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_config_error_from_the_command_line_names_the_key_once():
    r = launch("sleep_forever", "--simulate", "3", DEFAULT, timeout=20)
    assert r.returncode == 2
    assert r.stderr.count("cluster.ranks_per_node=4 does not divide") == 1
    assert "simulating" not in r.stderr and r.stdout == ""


def test_ranks_run_the_launchers_checks(tmp_path):
    """A rank started without the launcher (e.g. by a scheduler) refuses the same config with exit 2."""
    r = subprocess.run([sys.executable, "-m", "hetsp.train", DEFAULT, "--set", "planner.name=\"greedyy\""],
                       cwd=ROOT, env=_env(WORLD_SIZE="4", RANK="1"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "planner.name must be one of" in r.stderr


def test_typed_choices_match_what_is_registered():
    import typing

    import solver
    from hetsp.attention.kernels import KERNEL_NAMES
    from hetsp.config import AttentionConfig, PlannerConfig, TrainConfig
    from hetsp.objectives import OBJECTIVES

    def choices(cls, name):
        return sorted(typing.get_args(typing.get_type_hints(cls)[name]))

    assert choices(PlannerConfig, "name") == solver.planner_names() == sorted(checks.PLANNER_OPTIONS)
    assert choices(AttentionConfig, "kernel") == sorted(KERNEL_NAMES)
    assert choices(TrainConfig, "objective") == sorted(OBJECTIVES)


def test_every_shipped_config_passes_the_checks():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(path)
        world = 64 if "64gpu" in path.name else 4
        checks.check_run(cfg, world)


# ----------------------------------------------------------------------------- one run per folder


def _start(target: str, *args: str) -> tuple[subprocess.Popen, queue.Queue]:
    proc = subprocess.Popen(_launcher_argv(target, *args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    return proc, lines


def _wait_for(lines: queue.Queue, count: int) -> list[str]:
    got = []
    while len(got) < count:
        line = lines.get(timeout=90)
        assert line is not None, "launcher ended early"
        if "ready pid" in line:
            got.append(line)
    return got


def test_second_launcher_on_a_locked_folder_exits_naming_the_holder(config, tmp_path):
    run_dir = tmp_path / "run"
    first, lines = _start("sleep_forever", "--simulate", "1", "--run-dir", str(run_dir), str(config))
    try:
        _wait_for(lines, 1)
        second = launch("sleep_forever", "--simulate", "1", "--run-dir", str(run_dir), str(config), timeout=30)
        assert second.returncode == 2
        assert f"in use by process {first.pid} on {socket.gethostname()}" in second.stderr
        assert str(run_dir / LOCK_NAME) in second.stderr and "simulating" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=30)
    assert not (run_dir / LOCK_NAME).exists()  # released when the first job ended


def test_stale_lock_of_a_dead_process_is_replaced(config, tmp_path):
    run_dir = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    r = launch("allreduce", "--simulate", "2", "--run-dir", str(run_dir), str(config), timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"removed a stale lock of process {dead.pid}" in r.stderr
    assert not (run_dir / LOCK_NAME).exists()


def test_lock_held_from_another_host_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(RunFolderBusy, match="in use by process 1 on elsewhere.example"):
        RunLock(tmp_path).acquire()


# ----------------------------------------------------------------------------- hung ranks


@pytest.mark.parametrize("mode", [["--simulate", "3"], ["--nproc-per-node", "3"]], ids=["simulate", "torchrun"])
def test_a_stopped_rank_is_named_and_the_job_stopped(config, mode):
    proc, lines = _start("beat_then_wait", *mode, "--all-ranks", "--set", "run.heartbeat_timeout_s=2", str(config))
    pids = {}
    try:
        for line in _wait_for(lines, 3):  # "[rank 1] ready pid N" or torchrun's "[default1]:ready pid N"
            match = re.search(r"\[(?:rank |default)(\d+)\]:? ?ready pid (\d+)", line)
            assert match, line
            pids[int(match.group(1))] = int(match.group(2))
        os.kill(pids[1], signal.SIGSTOP)
        # the barrier's timeout is 600 s: ending well before means the heartbeat caught it
        assert proc.wait(timeout=60) == 1
        err = proc.stderr.read()
        assert "rank 1 made no progress (no heartbeat)" in err and "run.heartbeat_timeout_s = 2" in err
        assert "rank 0 made no progress" not in err and "rank 2 made no progress" not in err
        for pid in pids.values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        proc.kill()
        proc.wait()
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------- host resources


def test_host_problems():
    gib = 1024**3
    assert host_problems(4, gib, 23 * gib, 2) == []
    too_many = host_problems(64, gib, 23 * gib, 2)
    assert len(too_many) == 2
    assert "64 ranks need about 64.0 GiB" in too_many[0] and "23.0 GiB available" in too_many[0]
    assert "more than 4 per core" in too_many[1]


def _seed_library_cache(tmp_path: Path, value: int) -> dict[str, str]:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ.update(env)
    try:
        path = _cache_file()
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = old
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({_versions_key(): value}))
    return env


def test_launcher_refuses_ranks_the_host_cannot_hold(tmp_path):
    # a rank's libraries as measured on a CPU machine (about 0.5 GiB): 64 ranks exceed any test host
    env = _seed_library_cache(tmp_path, 500 * 2**20)
    r = subprocess.run([sys.executable, "-m", "launcher", "--device", "cpu", "--simulate", "64", DEFAULT,
                        "--set", "cluster.ranks_per_node=0", "--set", f"run.output_dir={json.dumps(str(tmp_path))}"],
                       cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "64 ranks need about" in r.stderr and "libraries 0.49 GiB + data" in r.stderr
    assert "--force" in r.stderr and "simulating" not in r.stderr


def test_force_starts_anyway_with_a_warning(tmp_path, monkeypatch, capsys):
    env = _seed_library_cache(tmp_path, 500 * 2**20)
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    started = []
    monkeypatch.setattr(launcher_main, "_simulate", lambda args, gpus, cfg: started.append(args.num_ranks) or 0)
    rc = launcher_main.main(["--device", "cpu", "--simulate", "64", "--force", DEFAULT, "--set",
                             "cluster.ranks_per_node=0", "--set", f"run.output_dir={json.dumps(str(tmp_path))}"])
    assert rc == 0 and started == [64]
    assert "warning: 64 ranks need about" in capsys.readouterr().err


# ----------------------------------------------------------------------------- preemption


def _metrics_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


STEPS = 20  # enough that a SIGTERM forwarded by torchrun still lands before the last step


def _tiny_toml(tmp_path: Path, name: str) -> Path:
    from hetsp.config import config_from_dict, config_to_toml

    from .test_train_loop import tiny_config

    cfg = tiny_config(tmp_path, name, planner="static", steps=STEPS, eval_every=0, checkpoint_every=0)
    path = tmp_path / f"{name}.toml"
    path.write_text(config_to_toml(config_from_dict(cfg)))
    return path


def _launch_training(path: Path, mode: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "--device", "cpu", *mode, str(path), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """STEPS steps on 2 ranks, never stopped: the reference of the preemption tests."""
    tmp = tmp_path_factory.mktemp("straight")
    r = _launch_training(_tiny_toml(tmp, "straight"), ["--simulate", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, _metrics_losses(tmp / "runs" / "straight")


@pytest.mark.parametrize("mode", [
    ["--simulate", "2"],
    pytest.param(["--nproc-per-node", "2"], marks=pytest.mark.slow),
], ids=["simulate", "torchrun"])
def test_sigterm_checkpoints_the_current_step_and_resumes_bitwise(straight_run, mode):
    """SIGTERM to the launcher (a scheduler's preemption) reaches the ranks (under torchrun, through
    torchrun), which checkpoint at the end of the step they are in; --resume then continues exactly as
    a run that was never stopped."""
    import time

    tmp, reference = straight_run
    name = f"preempted_{mode[0].strip('-').replace('-', '_')}"
    path = _tiny_toml(tmp, name)
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "--device", "cpu", *mode, str(path)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    plans = tmp / "runs" / name / "plans.jsonl"
    try:
        while not (plans.is_file() and len(plans.read_text().splitlines()) >= 2):  # step 1 under way
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    ckpt = tmp / "runs" / name / "checkpoints"
    tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert len(tags) == 1 and 2 <= int(tags[0][4:]) < STEPS, tags
    assert f"SIGTERM: checkpoint of step {int(tags[0][4:])} written" in out + err
    resumed = _launch_training(path, mode, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _metrics_losses(tmp / "runs" / name) == reference
