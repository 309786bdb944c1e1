"""Rank functions for tests/test_metrics.py."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist


def log_one_step(run_dir: str) -> tuple[int, bool]:
    """Every rank opens a logger on the same folder; only rank 0 writes. Returns (world size seen, wrote)."""
    from hetsp.metrics import MetricsLogger

    logger = MetricsLogger(Path(run_dir), dist.get_rank() == 0, 1, progress="off")
    out = logger.log_step(0, {"loss": 1.0, "tokens": 300, "step_time_s": 1.0, "plan_time_s": 0.0})
    logger.close()
    dist.barrier()
    return logger.world_size, out is not None


def exchange_wait_is_counted() -> tuple[float, float, float]:
    """Reset COMM_WAIT, swap a tensor with the other rank of a 2-rank world through `Exchange`,
    and return (total after reset, total after the exchange, total after an empty exchange)."""
    import torch

    from hetsp.comm import Exchange
    from hetsp.metrics.timing import COMM_WAIT

    COMM_WAIT.reset()
    before = COMM_WAIT.total()
    peer = 1 - dist.get_rank()
    recv = torch.empty(1000)
    Exchange([(torch.ones(1000), peer)], [(recv, peer)], tag=7).wait()
    after = COMM_WAIT.total()
    Exchange([], [], tag=7).wait()
    return before, after, COMM_WAIT.total() - after
