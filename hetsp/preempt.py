"""Preemption: SIGTERM asks the ranks to checkpoint at the end of the current step and stop.

A scheduler's SIGTERM (directly, or forwarded by torchrun or hetsp-launch) may reach
some ranks and not others, and at different moments; a rank must not stop alone, or
its peers would wait for it in the next collective. So the handler only sets a flag,
and once per step every rank takes part in one small all-reduce (MAX) of the flags:
all ranks see the request at the end of the same step, checkpoint together and
leave. The launcher gives them `run.stop_grace_s` before it kills them.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    """``with StopRequest() as stop:`` ... ``if stop.agreed(): checkpoint and leave``."""

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self._saved: Any = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._saved = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_received = signum

    def __exit__(self, *exc: Any) -> None:
        if self._saved is not None:
            signal.signal(signal.SIGTERM, self._saved)
            self._saved = None

    def agreed(self, device: Any = "cpu") -> bool:
        """Whether any rank received SIGTERM (collective: every rank calls it once per step)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.signal_received is None else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
