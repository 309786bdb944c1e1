"""Run a set of children to completion: the first one that fails, a child the watchdog reports
(e.g. a rank whose heartbeat stopped), or a SIGINT/SIGTERM to the launcher stops all the others.

How the others are stopped is the caller's `StopPolicy`: ranks that checkpoint on SIGTERM
(preemption) get SIGTERM and a grace period only when the launcher itself received SIGTERM;
after a failure they are killed at once, since they would wait in a collective for a peer
that is gone."""

from __future__ import annotations

import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .ranks import ChildProcess

POLL_S = 0.2


@dataclass
class Outcome:
    exits: dict[str, int] = field(default_factory=dict)  # child name -> exit code, in exit order
    first_failure: str | None = None  # name of the first child that exited non-zero
    signal_received: int | None = None  # SIGINT/SIGTERM that stopped the job
    stragglers: list[str] = field(default_factory=list)  # still running `finish_grace_s` after one finished
    hung: dict[str, str] = field(default_factory=dict)  # child name -> why the watchdog stopped the job

    @property
    def ok(self) -> bool:
        return self.first_failure is None and self.signal_received is None and not self.stragglers and not self.hung


@dataclass(frozen=True)
class StopPolicy:
    """Signals that stop the remaining children: (signal, seconds to wait) in order, SIGKILL last."""

    on_failure: tuple[tuple[int, float], ...] = ((signal.SIGTERM, 5.0),)
    on_sigterm: tuple[tuple[int, float], ...] = ((signal.SIGTERM, 5.0),)
    on_sigint: tuple[tuple[int, float], ...] = ((signal.SIGTERM, 5.0),)

    def steps(self, received: int | None) -> tuple[tuple[int, float], ...]:
        if received == signal.SIGTERM:
            return self.on_sigterm
        if received == signal.SIGINT:
            return self.on_sigint
        return self.on_failure


class _SignalTrap:
    """While active, SIGINT/SIGTERM are recorded; a second one kills every child at once."""

    def __init__(self, children: list[ChildProcess]):
        self.children = children
        self.received: int | None = None
        self._saved: dict[int, object] = {}

    def __enter__(self) -> "_SignalTrap":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            for child in self.children:
                child.signal_group(signal.SIGKILL)
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def supervise(children: list[ChildProcess], *, stop: StopPolicy = StopPolicy(),
              finish_grace_s: float | None = None, watchdog: Callable[[set[str]], dict[str, str]] | None = None) -> Outcome:
    """Start `children`, wait for all of them to exit 0, or stop them all at the first failure.

    finish_grace_s: once one child has exited 0, how long the others may still run before
    they are taken as hung (e.g. waiting in a collective for a peer that is gone) and stopped.
    watchdog: called about every POLL_S seconds with the names of the children still running; a
    non-empty answer ({child name: why}, e.g. a rank without heartbeat) stops the job and is kept
    in `Outcome.hung`.
    """
    outcome = Outcome()
    exits: queue.Queue[tuple[str, int]] = queue.Queue()
    with _SignalTrap(children) as trap:
        started: list[ChildProcess] = []
        try:
            for child in children:
                child.start()
                started.append(child)
        except BaseException:  # e.g. the interpreter cannot be executed
            for child in started:
                child.signal_group(signal.SIGKILL)
                child.wait()
            raise
        for child in children:
            child.start_reader()
            threading.Thread(target=lambda c=child: exits.put((c.name, c.wait())), daemon=True).start()

        pending = {c.name for c in children}
        first_finish: float | None = None
        while pending and trap.received is None:
            if first_finish is not None and finish_grace_s is not None \
                    and time.monotonic() - first_finish > finish_grace_s:
                outcome.stragglers = [c.name for c in children if c.name in pending]
                break
            if watchdog is not None:
                outcome.hung = watchdog(pending)
                if outcome.hung:
                    break
            try:
                name, code = exits.get(timeout=POLL_S)
            except queue.Empty:
                continue
            pending.discard(name)
            outcome.exits[name] = code
            if code != 0:
                outcome.first_failure = name
                break
            if first_finish is None:
                first_finish = time.monotonic()
        outcome.signal_received = trap.received
        if pending:
            _stop(children, pending, exits, outcome, stop.steps(trap.received))
    for child in children:
        child.signal_group(signal.SIGKILL)  # leftovers the children started in their groups
        child.join_output(timeout=2.0)
    return outcome


def _stop(children, pending: set[str], exits: queue.Queue, outcome: Outcome,
          steps: tuple[tuple[int, float], ...]) -> None:
    by_name = {c.name: c for c in children}
    for sig, wait_s in (*steps, (signal.SIGKILL, 10.0)):
        for name in pending:
            by_name[name].signal_group(sig)
        deadline = time.monotonic() + wait_s
        while pending and time.monotonic() < deadline:
            try:
                name, code = exits.get(timeout=POLL_S)
            except queue.Empty:
                continue
            pending.discard(name)
            outcome.exits.setdefault(name, code)
        if not pending:
            return
