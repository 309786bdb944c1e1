"""Rank heartbeats: each rank touches a file every few seconds; the launcher watches the files.

A thread in the rank process rewrites ``<dir>/rank_<r>`` every `interval_s`. It keeps
beating while the rank waits in a collective for a peer, so when one rank is stopped
(SIGSTOP), frozen or swapped out, its file alone goes stale and the launcher can name
it long before the distributed timeout. The launcher sets the folder and the interval
in the rank's environment (`DIR_VAR`, `INTERVAL_VAR`); without them no thread starts.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Mapping

DIR_VAR = "HETSP_HEARTBEAT_DIR"
INTERVAL_VAR = "HETSP_HEARTBEAT_INTERVAL_S"


def interval_for(timeout_s: float) -> float:
    """How often a rank beats so that `timeout_s` spans several beats."""
    return min(5.0, max(0.05, timeout_s / 6))


def beat_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank_{rank}"


def start_from_env(rank: int, environ: Mapping[str, str] | None = None) -> threading.Thread | None:
    """Start this rank's heartbeat thread when the launcher asked for one."""
    env = os.environ if environ is None else environ
    folder = env.get(DIR_VAR)
    if not folder:
        return None
    interval = float(env.get(INTERVAL_VAR, "5"))
    path = beat_file(Path(folder), rank)

    def beat() -> None:
        while True:
            try:
                path.write_text(f"{os.getpid()} {time.time():.3f}\n")
            except OSError:
                pass  # the launcher removed the folder at the end of the job
            time.sleep(interval)

    thread = threading.Thread(target=beat, name="hetsp-heartbeat", daemon=True)
    thread.start()
    return thread


class HeartbeatWatch:
    """The launcher's side: which ranks' files are older than `timeout_s`."""

    def __init__(self, folder: Path, timeout_s: float):
        self.folder = Path(folder)
        self.timeout_s = timeout_s

    def stale(self, now: float | None = None) -> list[tuple[str, float]]:
        """(child name "rank r", seconds since its last beat) for every rank past the timeout whose
        process still exists (a rank that has exited stops beating and is not hung)."""
        now = time.time() if now is None else now
        out = []
        for path in sorted(self.folder.glob("rank_*")):
            try:
                age = now - path.stat().st_mtime
                pid = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if age > self.timeout_s and _running(pid):
                out.append((f"rank {path.name.split('_', 1)[1]}", age))
        return out


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True
