"""Rank functions for tests/test_checkpoint_safety.py: planning with stand-in data."""

from __future__ import annotations

import torch.distributed as dist

from hetsp.config import config_from_dict


class _Lengths:
    """The part of a DataModule that planning reads: the vocabulary and each step's lengths."""

    vocab_size = 10

    def __init__(self, lengths: list[int]):
        self.lengths = lengths

    def train_batch_lengths(self, step: int) -> list[int]:
        return list(self.lengths)


def plan_steps(cfg_dict: dict, lengths: list[int], steps: int):
    """Plan `steps` batches on every rank; return ("ok", fallback summary) or (exception type, message)."""
    from hetsp.planning import Planning

    planning = Planning(config_from_dict(cfg_dict), _Lengths(lengths), dist.get_world_size(), dist.get_rank())
    try:
        for step in range(steps):
            planning.plan_for(step)
        return "ok", planning.fallback_summary() if dist.get_rank() == 0 else None
    except Exception as e:  # what each rank saw
        return type(e).__name__, str(e)
    finally:
        planning.close()
