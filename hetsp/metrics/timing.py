"""Time this process spends blocked in exchanges, for the ``comm_s`` metric.

Every exchange of hetsp (ring attention's K/V passes, SSM state and halo
exchanges) completes in `hetsp.comm.Exchange.wait`, deep inside autograd
functions that take no timer argument, and on CUDA the backward ones run on
autograd's own threads, where a context variable set by the executor is not
visible. So the accumulator is one explicit process-local object, `COMM_WAIT`,
owned here: `Exchange.wait` adds to it, the executor reads the difference
over a step (`BlockedTime.total` before and after), and tests `reset` it.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator


class BlockedTime:
    """Seconds spent inside `measure()` blocks, summed over every thread of the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self._seconds += dt

    def total(self) -> float:
        """Seconds accumulated since the process started (or the last `reset`)."""
        with self._lock:
            return self._seconds

    def reset(self) -> None:
        with self._lock:
            self._seconds = 0.0


COMM_WAIT = BlockedTime()
