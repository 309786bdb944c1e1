"""Rank functions that run the training loop inside the rank pool."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from hetsp.config import config_from_dict


def run_train(cfg_dict: dict, resume: bool = False):
    """Run `hetsp.train.train` on every rank; rank 0 returns the metrics records."""
    from hetsp.train import train

    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    cfg = config_from_dict(cfg_dict)
    train(cfg, resume)
    if dist.get_rank() != 0:
        return None
    path = Path(cfg.run.output_dir) / cfg.run.name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
