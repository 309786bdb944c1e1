"""One run per run folder: an exclusive lock file naming its holder (process id and host).

The launcher takes `RUN/.hetsp.lock` before it starts any rank and removes it when the
job ends. A second launcher on the same folder is refused with the holder's pid, host
and start time. A lock left behind by a process that no longer exists on this host is
stale: it is replaced, and the replacement is said. A lock held from another host
cannot be checked from here: it is refused with the path to remove if that run is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".hetsp.lock"


class RunFolderBusy(RuntimeError):
    """Another live run holds the folder's lock; the message names it."""


def run_folder(output_dir: str, name: str, override: str | None) -> Path:
    """The run folder: `override` (``--run-dir``) when given, else output_dir/name."""
    return Path(override) if override else Path(output_dir) / name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(run_dir) as lock:`` holds the folder for this process; `notes` says what was replaced."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.notes: list[str] = []
        self._held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._clear_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise RunFolderBusy(f"could not take the lock {self.path} (it keeps reappearing)")

    def _clear_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            raise RunFolderBusy(f"run folder {self.path.parent} has a lock {self.path} that cannot be read; "
                                "if no run uses this folder, remove that file") from None
        where = f"process {pid} on {host} (since {holder.get('started', '?')})"
        if host != socket.gethostname():
            raise RunFolderBusy(f"run folder {self.path.parent} is in use by {where}; lock {self.path}. "
                                "Use another run.name, or remove the lock if that run is gone")
        if _alive(pid):
            raise RunFolderBusy(f"run folder {self.path.parent} is in use by {where}; lock {self.path}. "
                                "Use another run.name or --run-dir, or stop that run first")
        self.notes.append(f"removed a stale lock of {where}, which no longer runs")
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
