"""hetsp-launch: simulated ranks, output prefixes, fail-fast on a dead rank, signals, config errors,
dry runs, and a two-node torchrun job on 127.0.0.1. Rank programs live in tests/launch_targets/."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from launcher.__main__ import main
from launcher.devices import simulated_arrangement, threads_per_rank, torchrun_arrangement, available_cores
from launcher.rank_env import RankEnv, resolve_device
from launcher.ranks import final_state
from launcher.simulate import free_port
from launcher.torchrun import torchrun_command

ROOT = Path(__file__).resolve().parents[1]
TARGETS = "tests.launch_targets"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "HETSP_RANK_MODULE")}
    env.update(extra)
    return env


def _launcher_argv(target: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", "--module", f"{TARGETS}.{target}", "--device", "cpu", *args]


def launch(target: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """Run the launcher to the end; a hang fails the test through the timeout."""
    return subprocess.run(_launcher_argv(target, *args), cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f"[run]\noutput_dir = {json.dumps(str(tmp_path / 'runs'))}\n[train]\nsteps = 1\n")
    return path


def _echoed(stdout: str) -> dict[str, dict]:
    """The ENV lines of echo_env, keyed by the rank prefix they were printed under."""
    found = {}
    for line in stdout.splitlines():
        prefix, sep, rest = line.partition("] ENV ")
        if sep:
            found[prefix + "]"] = json.loads(rest)
    return found


# ----------------------------------------------------------------------------- simulated ranks


def test_simulate_three_ranks_all_reduce_shows_rank_0(config):
    r = launch("allreduce", "--simulate", "3", str(config), HETSP_TEST_EXPECT_WORLD="3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "[rank 0] rank 0 of 3: sum 6 ok on cpu with gloo" in lines
    assert all(line.startswith("[rank 0] ") for line in lines), r.stdout
    assert "simulating 3 rank(s)" in r.stderr


def test_all_ranks_prefixes_and_rank_environment(config, tmp_path):
    run_dir = tmp_path / "run"
    r = launch("echo_env", "--simulate", "3", str(config), "--set", "train.steps=2", "--resume",
               "--all-ranks", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    echoed = _echoed(r.stdout)
    assert sorted(echoed) == ["[rank 0]", "[rank 1]", "[rank 2]"]
    ports = set()
    for rank in range(3):
        e = echoed[f"[rank {rank}]"]
        assert e["RANK"] == e["LOCAL_RANK"] == str(rank)
        assert e["WORLD_SIZE"] == e["LOCAL_WORLD_SIZE"] == "3"
        assert e["MASTER_ADDR"] == "127.0.0.1"
        assert e["HETSP_DEVICE"] == "cpu" and e["HETSP_DIST_BACKEND"] == "gloo"
        assert e["OMP_NUM_THREADS"] == str(max(1, available_cores() // 3))
        assert e["HETSP_RUN_DIR"] == str(run_dir)
        assert e["argv"] == [str(config), "--set", "train.steps=2", "--resume"]
        ports.add(e["MASTER_PORT"])
        log = (run_dir / "logs" / f"rank_{rank}.log").read_text()
        assert f"hello from rank {rank}" in log
    assert len(ports) == 1
    assert "[rank 1] hello from rank 1" in r.stdout.splitlines()


def test_rank_that_raises_stops_the_job_and_is_named(config):
    r = launch("fail_on_rank", "--simulate", "3", str(config), timeout=30)
    assert r.returncode == 1
    assert "rank 1 failed (exit code 1)" in r.stderr
    assert "RuntimeError: boom on rank 1" in r.stderr
    # the last lines of rank 1 are shown although only rank 0 is shown live
    assert "rank 1 line 29" in r.stderr and "rank 1 line 5\n" not in r.stderr
    assert "rank 1 line" not in r.stdout
    # killed, not asked to stop: SIGTERM would make hetsp ranks checkpoint first (preemption)
    assert "rank 0: killed by SIGKILL" in r.stderr and "rank 2: killed by SIGKILL" in r.stderr


def test_rank_that_exits_while_others_wait_in_a_collective(config):
    r = launch("hang_in_collective", "--simulate", "3", str(config), timeout=60)
    assert r.returncode == 1
    assert "rank 1 failed (exit code 3)" in r.stderr
    assert "rank 1 leaving without a word" in r.stderr


def _read_lines(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


@pytest.mark.parametrize(
    "sig, mode",
    [(signal.SIGTERM, ["--simulate", "2"]), (signal.SIGINT, ["--simulate", "2"]),
     (signal.SIGTERM, ["--nproc-per-node", "2"])],
    ids=["simulate-SIGTERM", "simulate-SIGINT", "torchrun-SIGTERM"],
)
def test_signal_to_the_launcher_stops_every_rank(config, sig, mode):
    proc = subprocess.Popen(_launcher_argv("sleep_forever", *mode, "--all-ranks", str(config)),
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    pids = []
    try:
        while len(pids) < 2:
            line = lines.get(timeout=60)
            assert line is not None, proc.stderr.read()
            if "ready pid" in line:
                pids.append(int(line.split()[-1]))
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 128 + sig
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        proc.kill()
        proc.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------- config and usage errors


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("[train]\nbogus = 1\n", [], "unknown key 'train.bogus'"),
        ('[train]\nsteps = "ten"\n', [], "train.steps must be an integer"),
        ("", ["--set", "model.hidden_size=wide"], "model.hidden_size must be an integer"),
        ("", ["--set", "nosuch.key=1"], "unknown key 'nosuch'"),
    ],
)
def test_config_error_exits_2_naming_key_and_file(tmp_path, capsys, text, overrides, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    rc = main(["--module", f"{TARGETS}.echo_env", "--simulate", "2", str(path), *overrides])
    out, err = capsys.readouterr()
    assert rc == 2
    assert expected in err and str(path) in err
    assert "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1


def test_missing_config_file_exits_2_from_the_command_line(tmp_path):
    missing = tmp_path / "nowhere.toml"
    r = launch("echo_env", "--simulate", "2", str(missing))
    assert r.returncode == 2
    assert f"config file {missing} does not exist" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--simulate", "2", "--nnodes", "2"], "--simulate runs on this host only"),
        (["--simulate", "0"], "need at least 1 rank"),
        (["--nnodes", "2", "--node-rank", "0"], "needs --rdzv-endpoint"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "outside 0..1"),
        (["--nnodes", "2", "--rdzv-endpoint", "nohostport"], "expected HOST:PORT"),
    ],
)
def test_conflicting_options_exit_2(config, capsys, args, expected):
    assert main([*args, str(config)]) == 2
    assert expected in capsys.readouterr().err


# ----------------------------------------------------------------------------- dry run


@pytest.mark.parametrize(
    "args, world",
    [(["--simulate", "4"], "4"), (["--nnodes", "2", "--nproc-per-node", "3", "--rdzv-endpoint", "h:1"], "6")],
)
def test_dry_run_runs_one_rank_program_with_the_declared_world(config, args, world):
    r = launch("echo_env", *args, str(config), "--dry-run", MASTER_ADDR="10.9.9.9")
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout.split("ENV ", 1)[1])
    assert e["WORLD_SIZE"] == world and e["RANK"] == "0"
    assert e["MASTER_ADDR"] is None  # no process group can form
    assert e["argv"] == [str(config), "--dry-run"]
    assert "[rank" not in r.stdout


# ----------------------------------------------------------------------------- devices and environment


def test_arrangements():
    cpu = simulated_arrangement(3, 0)
    assert cpu.devices == ("cpu",) * 3 and cpu.backend == "gloo"
    one = simulated_arrangement(1, 1)
    assert one.devices == ("cuda:0",) and one.backend == "nccl"
    shared = simulated_arrangement(3, 1)
    assert shared.devices == ("cuda:0",) * 3 and shared.backend == "gloo"
    assert simulated_arrangement(4, 2).devices == ("cuda:0", "cuda:1", "cuda:0", "cuda:1")
    assert torchrun_arrangement(8, 8).backend == "nccl" and torchrun_arrangement(8, 8).devices == ("cuda",)
    assert torchrun_arrangement(4, 1).backend == "gloo"
    assert torchrun_arrangement(2, 0).devices == ("cpu",)
    assert threads_per_rank(3, cores=2) == 1 and threads_per_rank(2, cores=16) == 8


def test_rank_env_and_device_resolution():
    env = RankEnv.from_environ({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                                "MASTER_ADDR": "h", "MASTER_PORT": "29500", "HETSP_DEVICE": "cuda",
                                "HETSP_DIST_BACKEND": "nccl", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 8, 4)
    assert (env.master_port, env.restart_count, env.backend) == (29500, 2, "nccl")
    assert resolve_device(env.device, env.local_rank, 4) == "cuda:1"
    assert resolve_device("cuda", 5, 4) == "cuda:1"
    assert resolve_device("cpu", 3, 0) == "cpu"
    with pytest.raises(ValueError, match="no GPU"):
        resolve_device("cuda", 0, 0)
    alone = RankEnv.from_environ({})
    assert (alone.rank, alone.world_size, alone.device, alone.backend) == (0, 1, "cpu", "gloo")


# ----------------------------------------------------------------------------- torchrun


def test_torchrun_command_line():
    cmd = torchrun_command(nnodes=2, node_rank=1, nproc_per_node=4, rdzv_endpoint="10.0.0.1:29400",
                           max_restarts=3, module="hetsp.train", rank_args=["c.toml", "--resume"],
                           log_dir="/logs", all_ranks=False)
    assert Path(cmd[0]).name in ("torchrun", Path(sys.executable).name)
    text = " ".join(cmd)
    assert ("--nnodes 2 --node-rank 1 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29400 "
            "--max-restarts 3") in text
    assert text.endswith("--local-ranks-filter 0 -m hetsp.train c.toml --resume")
    single = torchrun_command(nnodes=1, node_rank=0, nproc_per_node=2, rdzv_endpoint=None, max_restarts=0,
                              module="m", rank_args=["c.toml"], log_dir="/logs", all_ranks=True)
    assert "--standalone" in single and "--local-ranks-filter" not in single


def test_two_nodes_through_torchrun_on_one_host(config):
    endpoint = f"127.0.0.1:{free_port()}"
    env = _env(HETSP_TEST_EXPECT_WORLD="4")
    procs = [
        subprocess.Popen(
            _launcher_argv("allreduce", str(config), "--nnodes", "2", "--node-rank", str(node),
                           "--nproc-per-node", "2", "--rdzv-endpoint", endpoint, "--max-restarts", "0",
                           *(["--all-ranks"] if node == 1 else [])),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in range(2)
    ]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for node, (p, (out, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, f"node {node}:\n{out}\n{err}"
        assert (f"--nnodes 2 --node-rank {node} --nproc-per-node 2 --rdzv-backend c10d "
                f"--rdzv-endpoint {endpoint} --max-restarts 0") in err
    # c10d's rendezvous, not --node-rank, orders the nodes: each holds a contiguous pair of ranks
    shown = [sorted(int(m) for m in re.findall(r"rank (\d) of 4: sum 10 ok", out)) for out, _ in results]
    assert len(shown[0]) == 1  # local rank 0 only
    assert len(shown[1]) == 2 and shown[1][0] % 2 == 0 and shown[1][1] == shown[1][0] + 1  # --all-ranks
    assert shown[0][0] == 2 - shown[1][0]


def test_torchrun_rank_failure_is_named_with_its_last_lines(config):
    r = launch("fail_on_rank", str(config), "--nproc-per-node", "3", timeout=60)
    assert r.returncode == 1
    assert "rank 1 (local rank 1) failed first" in r.stderr
    assert "[launcher]   | RuntimeError: boom on rank 1" in r.stderr
    assert "[launcher]   | rank 1 line 29" in r.stderr


def test_progress_bar_redraws_collapse_to_their_final_state():
    assert final_state("step 1\n") == "step 1"
    assert final_state(" 10%|#  \r 50%|#####  \r100%|##########\r\n") == "100%|##########"
    assert final_state("\n") == ""


def test_ranks_still_running_after_another_finished_are_stopped(config):
    r = launch("finish_early", "--simulate", "3", str(config), "--finish-grace", "3", timeout=30)
    assert r.returncode == 1
    assert "rank 1 finished but rank 0, rank 2 kept running past the finish grace" in r.stderr
    assert "[launcher]   | rank 0 started" in r.stderr
