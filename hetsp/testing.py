"""A persistent pool of gloo ranks on CPU, for tests and benchmarks.

Starting a gloo world costs seconds here, so tests keep one pool per world
size for the whole session and send it functions to run on every rank::

    pool = RankPool(4)
    results = pool.run(my_module.fn, arg1, arg2)  # fn(*args) on ranks 0..3

`fn` must be importable by reference (a module-level function). Inside it,
`torch.distributed` is initialised (gloo, world `pool.world_size`) and each
rank uses one intra-op thread. If any rank raises, or the call does not
finish within `timeout`, the pool is torn down (the other ranks may be stuck
in a collective) and `RankError` carries the failing rank's traceback; the
next `run` starts a fresh world.

Comparisons follow one rule, the one `torch.testing.assert_close` applies:
an element passes when ``|a - b| <= atol + rtol * |b|``. `tolerance_ratio`
gives the worst element's share of its allowance, so results gathered from
many ranks can be reduced to one number and asserted ``<= 1``; it never
divides by the reference alone, so an all-zero reference (a 1-token
sequence's dq and dk) passes any kernel's round-off below `atol`.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import traceback
from typing import Any, Callable


def tolerance_ratio(actual: Any, expected: Any, *, atol: float, rtol: float) -> float:
    """max over elements of ``|actual - expected| / (atol + rtol * |expected|)``, in float64.

    At most 1 exactly when every element satisfies ``|a - b| <= atol + rtol |b|``.
    Shapes must match; a NaN on either side, or an infinity the other side lacks, counts as inf.
    Empty tensors give 0. ``atol`` must be positive (a zero reference needs it).
    """
    import torch

    if atol <= 0 or rtol < 0:
        raise ValueError(f"tolerance_ratio needs atol > 0 and rtol >= 0, got atol={atol}, rtol={rtol}")
    a = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    b = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"tolerance_ratio: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    same = a == b  # equal infinities; NaN is never equal (as assert_close's default)
    ratio = (a - b).abs() / (atol + rtol * b.abs())
    ratio = torch.where(same, torch.zeros_like(ratio), ratio.nan_to_num(nan=float("inf")))
    return float(ratio.max())


class RankError(RuntimeError):
    """A function failed (or hung) on a rank of a `RankPool`."""


def _worker(rank: int, world_size: int, init_file: str, tasks: Any, results: Any) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("HETSP_LOG_LEVEL", "WARNING")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=120),
        )
    except BaseException:
        results.put((rank, "err", traceback.format_exc()))
        return
    results.put((rank, "ready", None))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs, path = item
        for p in path:
            if p not in sys.path:
                sys.path.append(p)
        try:
            out = fn(*args, **kwargs)
            results.put((rank, "ok", out))
        except BaseException:
            results.put((rank, "err", traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """`world_size` spawned processes forming one gloo world, reused across calls."""

    def __init__(self, world_size: int, start_timeout: float = 120.0):
        self.world_size = world_size
        self.start_timeout = start_timeout
        self._procs: list[Any] = []
        atexit.register(self.close)

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        fd, init_file = tempfile.mkstemp(prefix="hetsp_pool_")
        os.close(fd)
        os.unlink(init_file)
        self._init_file = init_file
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, init_file, self._tasks[r], self._results), daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready", self.start_timeout, "starting the gloo world")

    def _collect(self, expect: str, timeout: float, what: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        got = 0
        deadline = time.monotonic() + timeout
        while got < self.world_size:
            remaining = deadline - time.monotonic()
            try:
                rank, status, payload = self._results.get(timeout=max(0.1, min(remaining, 1.0)))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    self.close()
                    raise RankError(f"rank(s) {dead} died while {what}") from None
                if remaining <= 0:
                    self.close()
                    raise RankError(f"timed out after {timeout:.0f}s while {what}") from None
                continue
            if status == "err":
                self.close()
                raise RankError(f"rank {rank} failed while {what}:\n{payload}")
            out[rank] = payload
            got += 1
        return out

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 300.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results."""
        if not self._procs:
            self._start()
        path = list(sys.path)
        for q in self._tasks:
            q.put((fn, args, kwargs, path))
        return self._collect("ok", timeout, f"running {getattr(fn, '__qualname__', fn)}")

    def close(self) -> None:
        if not self._procs:
            return
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive():
                try:
                    q.put(None)
                except Exception:
                    pass
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []
        try:
            os.unlink(self._init_file)
        except OSError:
            pass


_POOLS: dict[int, RankPool] = {}


def get_pool(world_size: int) -> RankPool:
    """The session-wide pool for `world_size` ranks (created on first use)."""
    pool = _POOLS.get(world_size)
    if pool is None:
        pool = _POOLS[world_size] = RankPool(world_size)
    return pool


def deepspeed_env_for_pool_rank(master_port: int) -> None:
    """DeepSpeed reads RANK, LOCAL_RANK, WORLD_SIZE and MASTER_* even when torch.distributed is
    already initialised (a `RankPool` worker): set them from the process group."""
    import os

    import torch.distributed as dist

    rank = dist.get_rank()
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(dist.get_world_size())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(master_port))
