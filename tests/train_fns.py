"""Rank functions that run the training loop inside the rank pool."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from hetsp.config import config_from_dict


def run_train(cfg_dict: dict, resume: bool = False, env: dict | None = None):
    """Run `hetsp.train.train` on every rank (with `env` set meanwhile); rank 0 returns
    the step it started from and the run folder's metrics records."""
    from hetsp.train import train

    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    cfg = config_from_dict(cfg_dict)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        span = train(cfg, resume)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if dist.get_rank() != 0:
        return None
    path = Path(cfg.run.output_dir) / cfg.run.name / "metrics.jsonl"
    return span["start"], [json.loads(line) for line in path.read_text().splitlines()]


def run_profile(cfg_dict: dict, out: str) -> None:
    """Measure the cost table on every rank (rank 0 writes `out`)."""
    from hetsp.train import profile

    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    profile(config_from_dict(cfg_dict), Path(out))
