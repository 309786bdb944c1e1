"""`--simulate N`: N ranks as child processes of the launcher on this host."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from hetsp import heartbeat

from .devices import Arrangement
from .rank_env import BACKEND_VAR, DEVICE_VAR, RUN_DIR_VAR
from .ranks import ChildProcess, describe_exit, log
from .supervise import Outcome, StopPolicy, supervise


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_environ(base: dict[str, str], *, rank: int, world: int, master_port: int, device: str,
                 backend: str, threads: int, run_dir: str | None) -> dict[str, str]:
    """The torchrun-style environment of simulated rank `rank` (single node: local rank = rank)."""
    env = dict(base)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port),
        PYTHONUNBUFFERED="1",
    )
    env[DEVICE_VAR] = device
    env[BACKEND_VAR] = backend
    env["OMP_NUM_THREADS"] = str(threads)
    if run_dir is not None:
        env[RUN_DIR_VAR] = run_dir
    return env


def heartbeat_watchdog(folder: Path, timeout_s: float):
    """A `supervise` watchdog: every rank whose heartbeat file is older than `timeout_s`, and why."""
    watch = heartbeat.HeartbeatWatch(folder, timeout_s)

    def check(running: set[str]) -> dict[str, str]:
        return {name: f"{name} made no progress (no heartbeat) for {age:.1f} s, over run.heartbeat_timeout_s = "
                f"{timeout_s:g}: stopped, frozen or swapped out?" for name, age in watch.stale() if name in running}

    return check


def run_simulated(module: str, rank_args: list[str], num_ranks: int, arrangement: Arrangement, *,
                  threads: int, all_ranks: bool, run_dir: str | None, finish_grace_s: float,
                  stop_grace_s: float, heartbeat_timeout_s: float) -> int:
    """Run every rank to the end; 0 if all exit 0, 1 if one fails or hangs, 128+signal if interrupted.

    A SIGTERM to the launcher is passed on to the ranks, which checkpoint at the end of their
    step; they get `stop_grace_s` before being killed. After a failure, a hung rank or SIGINT,
    the ranks are killed at once (they would only wait for the peer that is gone)."""
    port = free_port()
    log_dir = None
    if run_dir is not None:
        log_dir = Path(run_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
    beats = Path(tempfile.mkdtemp(prefix="hetsp-heartbeat-"))
    base = dict(os.environ)
    base[heartbeat.DIR_VAR] = str(beats)
    base[heartbeat.INTERVAL_VAR] = str(heartbeat.interval_for(heartbeat_timeout_s))
    children = [
        ChildProcess(
            f"rank {r}",
            [sys.executable, "-m", module, *rank_args],
            rank_environ(base, rank=r, world=num_ranks, master_port=port, device=arrangement.devices[r],
                         backend=arrangement.backend, threads=threads, run_dir=run_dir),
            prefix=f"[rank {r}] ",
            show=all_ranks or r == 0,
            log_path=None if log_dir is None else log_dir / f"rank_{r}.log",
        )
        for r in range(num_ranks)
    ]
    kill = ((signal.SIGKILL, 10.0),)
    policy = StopPolicy(on_failure=kill, on_sigint=kill, on_sigterm=((signal.SIGTERM, stop_grace_s),))
    try:
        outcome = supervise(children, stop=policy, finish_grace_s=finish_grace_s,
                            watchdog=heartbeat_watchdog(beats, heartbeat_timeout_s))
    finally:
        shutil.rmtree(beats, ignore_errors=True)
    return report(outcome, children)


def report(outcome: Outcome, children: list[ChildProcess]) -> int:
    """Log how the job ended (the failed rank's last lines included); return the exit status."""
    if outcome.ok:
        log(f"all {len(children)} rank(s) finished")
        return 0
    by_name = {c.name: c for c in children}
    if outcome.hung:
        for line in outcome.hung.values():
            log(line)
        log("stopped all ranks")
        first = next(iter(outcome.hung))
        if first in by_name:
            _show_tail(by_name[first])
        return 1
    if outcome.first_failure is not None:
        name = outcome.first_failure
        log(f"{name} failed ({describe_exit(outcome.exits[name])}); stopped the other ranks")
        _show_tail(by_name[name])
        others = [f"{n}: {describe_exit(c)}" for n, c in outcome.exits.items() if n != name]
        if others:
            log("other ranks: " + ", ".join(others))
        return 1
    if outcome.stragglers:
        done = [n for n, c in outcome.exits.items() if c == 0 and n not in outcome.stragglers]
        log(f"{', '.join(done)} finished but {', '.join(outcome.stragglers)} kept running past the finish "
            "grace (waiting for a peer that is gone?): stopped them")
        _show_tail(by_name[outcome.stragglers[0]])
        return 1
    sig = outcome.signal_received
    assert sig is not None
    log(f"received {signal.Signals(sig).name}: stopped all ranks")
    return 128 + sig


def _show_tail(child: ChildProcess) -> None:
    lines = child.tail()
    log(f"last {len(lines)} line(s) of {child.name}:")
    for line in lines:
        log(f"  | {line}")
