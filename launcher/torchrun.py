"""Multi-node jobs: build the torchrun command line, print it, run it as a supervised child.

torchrun (torch.distributed.run) owns the ranks of this node: it sets RANK/LOCAL_RANK/
WORLD_SIZE/..., restarts the worker group up to --max-restarts times (ranks see
TORCHELASTIC_RESTART_COUNT), and stops this node's ranks when one fails. Its console
output is prefixed ``[default<local rank>]:``; every rank's full output is kept under
``<log dir>/<run id>/attempt_<n>/<local rank>/``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from hetsp import heartbeat

from .devices import Arrangement
from .rank_env import BACKEND_VAR, DEVICE_VAR, RUN_DIR_VAR
from .ranks import ChildProcess, describe_exit, emit, log
from .supervise import StopPolicy, supervise

# torchrun's failure summary: "rank      : 1 (local_rank: 1)"
_FAILED_RANK = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)")


def torchrun_executable() -> list[str]:
    """The torchrun of this interpreter's environment (not whichever is first on PATH)."""
    script = Path(sys.executable).parent / "torchrun"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "torch.distributed.run"]


def torchrun_command(*, nnodes: int, node_rank: int, nproc_per_node: int, rdzv_endpoint: str | None,
                     max_restarts: int, module: str, rank_args: list[str], log_dir: str,
                     all_ranks: bool, shutdown_timeout_s: float | None = None) -> list[str]:
    """The full torchrun command line for this node (`shutdown_timeout_s`: how long torchrun lets
    its workers finish after SIGTERM, e.g. to checkpoint, before it kills them)."""
    cmd = torchrun_executable()
    cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--nproc-per-node", str(nproc_per_node)]
    if rdzv_endpoint is None:  # one node and no endpoint: torchrun picks a free local port
        cmd += ["--standalone"]
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
    cmd += ["--max-restarts", str(max_restarts), "--log-dir", log_dir, "--tee", "3"]
    if shutdown_timeout_s is not None:
        cmd += ["--shutdown-timeout", str(max(1, round(shutdown_timeout_s)))]
    if not all_ranks:
        cmd += ["--local-ranks-filter", "0"]
    cmd += ["-m", module, *rank_args]
    return cmd


def run_torchrun(module: str, rank_args: list[str], *, nnodes: int, node_rank: int, nproc_per_node: int,
                 rdzv_endpoint: str | None, max_restarts: int, arrangement: Arrangement, threads: int,
                 all_ranks: bool, run_dir: str | None, stop_grace_s: float, heartbeat_timeout_s: float) -> int:
    """Run torchrun for this node; return its exit status (1 when it fails, 128+signal if stopped)."""
    if run_dir is not None:
        log_dir = str(Path(run_dir) / "logs" / f"node_{node_rank}")
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    else:
        log_dir = tempfile.mkdtemp(prefix=f"hetsp-torchrun-node{node_rank}-")
    cmd = torchrun_command(nnodes=nnodes, node_rank=node_rank, nproc_per_node=nproc_per_node,
                           rdzv_endpoint=rdzv_endpoint, max_restarts=max_restarts, module=module,
                           rank_args=rank_args, log_dir=log_dir, all_ranks=all_ranks,
                           shutdown_timeout_s=stop_grace_s)
    beats = Path(tempfile.mkdtemp(prefix="hetsp-heartbeat-"))
    env = dict(os.environ)
    env[heartbeat.DIR_VAR] = str(beats)
    env[heartbeat.INTERVAL_VAR] = str(heartbeat.interval_for(heartbeat_timeout_s))
    env[DEVICE_VAR] = arrangement.devices[0]
    env[BACKEND_VAR] = arrangement.backend
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    if run_dir is not None:
        env[RUN_DIR_VAR] = run_dir
    log("starting: " + shlex.join(cmd))
    # torchrun's failure summary (about 10 lines per failed rank) must fit in the kept tail
    child = ChildProcess("torchrun", cmd, env, prefix="", show=True, tail_lines=200)
    # torchrun needs time to stop its own workers on SIGTERM before it is killed
    policy = StopPolicy(on_failure=((signal.SIGTERM, 20.0),), on_sigint=((signal.SIGTERM, 20.0),),
                        on_sigterm=((signal.SIGTERM, stop_grace_s + 20.0),))
    try:
        outcome = supervise([child], stop=policy, watchdog=_kill_stale_workers(beats, heartbeat_timeout_s))
    finally:
        shutil.rmtree(beats, ignore_errors=True)
    if outcome.hung:
        for line in outcome.hung.values():
            log(line)
        log("killed it; stopped torchrun")
        return 1
    if outcome.ok:
        log("torchrun finished")
        return 0
    if outcome.signal_received is not None:
        log(f"received {signal.Signals(outcome.signal_received).name}: stopped torchrun")
        return 128 + outcome.signal_received
    code = outcome.exits["torchrun"]
    lines = child.tail()
    failed = _root_cause(lines)
    who = f"rank {failed[0].group(1)} (local rank {failed[0].group(2)})" if failed else "a rank"
    log(f"torchrun failed ({describe_exit(code)}): {who} failed first")
    if failed:
        _show_rank_log(Path(log_dir), int(failed[0].group(2)), who)
    else:
        log(f"last {len(lines)} line(s) of torchrun:")
        for line in lines:
            emit(f"[launcher]   | {line}", sys.stderr)
    return 1


def _kill_stale_workers(folder: Path, timeout_s: float):
    """A watchdog that kills (SIGKILL) this node's workers whose heartbeat is stale, so that torchrun
    sees them fail (a stopped worker would otherwise hold the whole group until the timeout)."""
    from .simulate import heartbeat_watchdog

    check = heartbeat_watchdog(folder, timeout_s)

    def watchdog(running: set[str]) -> dict[str, str]:
        # torchrun's workers are not the launcher's children: every rank with a file counts (a rank
        # that has exited is not reported, see HeartbeatWatch.stale)
        stale = check({f"rank {p.name.split('_', 1)[1]}" for p in folder.glob("rank_*")})
        for name in stale:
            beat = heartbeat.beat_file(folder, int(name.split()[-1]))
            try:
                os.kill(int(beat.read_text().split()[0]), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass
        return stale

    return watchdog


def _root_cause(lines: list[str]) -> list[re.Match]:
    """Rank matches in torchrun's "Root Cause (first observed failure)" block, else in all lines."""
    starts = [i for i, line in enumerate(lines) if "Root Cause" in line]
    section = lines[starts[-1]:] if starts else lines
    return [m for line in section for m in _FAILED_RANK.finditer(line)]


def _show_rank_log(log_dir: Path, local_rank: int, who: str, num_lines: int = 20) -> None:
    """Print the last lines torchrun logged for `local_rank` in its latest attempt."""
    files = sorted(log_dir.glob(f"*/attempt_*/{local_rank}/std*.log"), key=lambda p: p.stat().st_mtime)
    if not files:
        log(f"no log of {who} under {log_dir}")
        return
    latest_attempt = files[-1].parent
    for path in sorted(latest_attempt.glob("std*.log")):
        lines = path.read_text(errors="replace").splitlines()[-num_lines:]
        if lines:
            log(f"last {len(lines)} line(s) of {who}, {path}:")
            for line in lines:
                emit(f"[launcher]   | {line}", sys.stderr)
