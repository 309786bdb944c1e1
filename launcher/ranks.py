"""One child process (a rank, or torchrun): started in its own session, output streamed with a
prefix, the last lines kept for the failure report, stopped as a whole process group."""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

TAIL_LINES = 20

_print_lock = threading.Lock()


def emit(line: str, stream=None) -> None:
    """Write one whole line (rank output never interleaves mid-line)."""
    stream = sys.stdout if stream is None else stream
    with _print_lock:
        stream.write(line + "\n")
        stream.flush()


def log(message: str) -> None:
    """The launcher's own messages go to stderr, rank output to stdout."""
    emit(f"[launcher] {message}", sys.stderr)


def _parent_death_hook() -> Callable[[], None] | None:
    """A pre-exec hook that has Linux kill the child with SIGKILL if the launcher dies first."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL))

    return hook


class ChildProcess:
    """A child whose merged stdout/stderr is read line by line by a thread.

    Lines are kept in a ring of the last `tail_lines`, appended to `log_path` when
    given, and echoed as ``prefix + line`` when `show` is true.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        *,
        prefix: str,
        show: bool,
        log_path: Path | None = None,
        tail_lines: int = TAIL_LINES,
    ):
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.prefix = prefix
        self.show = show
        self.log_path = log_path
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._tail_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the process; call `start_reader` once every child has been started."""
        self._proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # signals from the terminal reach the launcher only
            preexec_fn=_parent_death_hook(),
        )

    def start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read, name=f"read-{self.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        log_file = open(self.log_path, "a", encoding="utf-8") if self.log_path else None
        try:
            for raw in iter(self._proc.stdout.readline, b""):
                line = final_state(raw.decode("utf-8", "replace"))
                with self._tail_lock:
                    self._tail.append(line)
                if log_file is not None:
                    log_file.write(line + "\n")
                    log_file.flush()
                if self.show:
                    emit(self.prefix + line)
        finally:
            if log_file is not None:
                log_file.close()
            self._proc.stdout.close()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def wait(self) -> int:
        assert self._proc is not None
        return self._proc.wait()

    def poll(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the child's whole process group (it and anything it started)."""
        if self._proc is None:
            return
        try:  # also after the leader exited: whatever it started may still run in its group
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def join_output(self, timeout: float) -> None:
        """Wait (bounded) until the reader has drained the pipe, so `tail` is complete."""
        if self._reader is not None:
            self._reader.join(timeout)

    def tail(self) -> list[str]:
        with self._tail_lock:
            return list(self._tail)


def final_state(line: str) -> str:
    """A line without its terminator; of a progress bar redrawn with carriage returns, the last state."""
    segments = [seg for seg in line.rstrip("\r\n").split("\r") if seg.strip()]
    return segments[-1] if segments else ""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
