"""Per-group, per-rank metadata that ring attention needs (built once per micro-batch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hetsp.layout import ShardLayout, group_layouts

from .kernels import BlockKernel, select_kernel


@dataclass
class ShardContext:
    """What ring attention needs to know about this rank's shard.

    group_start, group_size: the group is global ranks [group_start, group_start + group_size).
    rank_in_group:           this rank's index in the group (global rank = group_start + rank_in_group).
    layout:                  this rank's `ShardLayout`.
    cu_seqlens:              int32 tensor (num sequences + 1,), local cumulative lengths.
    positions:               int64 tensor (T_local,), global positions in each token's own sequence.
    max_seqlen_local:        longest local piece of a sequence.
    kernel:                  the block kernel in use.
    layouts:                 every rank's layout (the sizes of visiting blocks).
    """

    group_start: int
    group_size: int
    rank_in_group: int
    layout: ShardLayout
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    max_seqlen_local: int
    kernel: BlockKernel
    layouts: tuple[ShardLayout, ...] = field(repr=False, default=())
    _steps: dict = field(default_factory=dict, repr=False)

    @property
    def global_rank(self) -> int:
        return self.group_start + self.rank_in_group

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    def steps(self, causal: bool, window: int | None = None):
        """The ring's blocks for this rank (cached per causal flag and sliding window)."""
        from .steps import ring_steps

        key = causal if window is None else (causal, window)
        if key not in self._steps:
            self._steps[key] = ring_steps(list(self.layouts), self.rank_in_group, causal, window)
        return self._steps[key]


def make_shard_context(
    lengths, group_start: int, group_size: int, global_rank: int, device, kernel: str = "auto", *, allow_empty_ranks: bool = False
) -> ShardContext:
    """The `ShardContext` of `global_rank` in group [group_start, group_start + group_size) for `lengths`.

    A rank of the group that would hold no token is refused on every rank of the group at once
    (all compute the same layouts from `lengths`, before any exchange): a stock model cannot run
    on 0 tokens, and its peers would wait in the ring. `allow_empty_ranks=True` is for callers
    that handle empty ranks (`ring_attention` called directly, SSM-only models).
    """
    import torch.distributed as dist

    if group_size < 1 or group_start < 0:
        raise ValueError(f"group [group_start={group_start}, size={group_size}) is invalid: need group_start >= 0 and group_size >= 1")
    if not (group_start <= global_rank < group_start + group_size):
        raise ValueError(f"rank {global_rank} is not in the group [{group_start}, {group_start + group_size}); pass the group this rank belongs to")
    if dist.is_initialized():
        world = dist.get_world_size()
        if group_start + group_size > world:
            raise ValueError(f"group [{group_start}, {group_start + group_size}) lies outside the world of {world} ranks; fix the plan's group")
    elif group_size > 1:
        raise ValueError(f"a group of {group_size} ranks needs torch.distributed initialised (init_process_group) first")
    device = torch.device(device)
    layouts = tuple(group_layouts(lengths, group_size))
    empty = [lay.rank for lay in layouts if lay.num_tokens == 0]
    if empty and not allow_empty_ranks:
        raise ValueError(
            f"ranks {[group_start + r for r in empty]} of group [{group_start}, {group_start + group_size}) would hold no token "
            f"({sum(lengths)} tokens in {len(lengths)} sequences over {group_size} ranks); use a smaller group, add a filler "
            "document of group_size tokens (as hetsp.executor does), or pass allow_empty_ranks=True when calling ring_attention directly"
        )
    lay = layouts[global_rank - group_start]
    return ShardContext(
        group_start=group_start,
        group_size=group_size,
        rank_in_group=global_rank - group_start,
        layout=lay,
        cu_seqlens=torch.tensor(lay.cu_seqlens, dtype=torch.int32, device=device),
        positions=torch.tensor(lay.positions, dtype=torch.int64, device=device),
        max_seqlen_local=lay.max_seqlen,
        kernel=select_kernel(kernel, device),
        layouts=layouts,
    )
