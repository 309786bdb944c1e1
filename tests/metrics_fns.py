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
