"""Checks that a config fits the world it runs on, before any rank builds anything."""

from __future__ import annotations

from hetsp.config import Config


def check_world(cfg: Config, world_size: int) -> None:
    """Raise ValueError saying what to change when `cfg` cannot run on `world_size` ranks."""
    p, c = cfg.planner, cfg.cluster
    if p.name == "static" and (p.group_size < 1 or world_size % p.group_size):
        raise ValueError(
            f"planner.group_size={p.group_size} does not divide the world of {world_size} ranks; "
            f"use a divisor of {world_size} (e.g. --set planner.group_size=1)"
        )
    if c.ranks_per_node and (c.ranks_per_node > world_size or world_size % c.ranks_per_node):
        raise ValueError(
            f"cluster.ranks_per_node={c.ranks_per_node} does not divide the world of {world_size} ranks "
            f"(set it to the ranks of one node, e.g. --set cluster.ranks_per_node={world_size} for one node of "
            f"{world_size}, or 0)"
        )
    bad = [d for d in p.allowed_group_sizes if d < 1 or d > world_size]
    if bad:
        raise ValueError(f"planner.allowed_group_sizes has sizes {bad} outside 1..{world_size}")
    if cfg.data.max_seq_len > c.tokens_per_rank * world_size:
        raise ValueError(
            f"data.max_seq_len={cfg.data.max_seq_len} exceeds what all {world_size} ranks can hold "
            f"(cluster.tokens_per_rank={c.tokens_per_rank} each): lower max_seq_len or raise tokens_per_rank"
        )
