"""Per-group, per-rank metadata that ring attention needs (built once per micro-batch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hetsp.backspace import StackStructure, is_plain
from hetsp.layout import ShardLayout, group_layouts

from .kernels import BlockKernel, select_kernel
from .kernels.base import Lifetimes


@dataclass
class ShardTree:
    """The stack structure (hetsp/backspace.py) of a group's packed sequences, as every rank sees it.

    structure: the packed `StackStructure` of the group (parents are packed indices).
    times:     per rank of the group, (T_r,) int64: each token's index in its own sequence.
    pops:      per rank of the group, (T_r,) int64: the index in its sequence where the token
               stops being visible (key i is visible to queries [i, pop)).
    """

    structure: StackStructure
    times: tuple[torch.Tensor, ...]
    pops: tuple[torch.Tensor, ...]


def _shard_tree(structure: StackStructure, layouts, device) -> ShardTree:
    as_long = dict(dtype=torch.int64, device=device)
    return ShardTree(
        structure=structure,
        times=tuple(torch.tensor(lay.positions, **as_long) for lay in layouts),
        pops=tuple(torch.tensor([structure.pops[g] for g in lay.token_index], **as_long) for lay in layouts),
    )


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
    tree:                    `ShardTree` of stack-structured (`<bkspc>`) sequences, or None
                             (then positions are plain positions and nothing is masked).
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
    tree: ShardTree | None = field(repr=False, default=None)

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

    @property
    def local_parents(self) -> torch.Tensor | None:
        """(1, T) int64 for the model (models/kernels/tree.py), None without a tree: each local token's
        parent as a local index, -1 at a document root, -2 when the parent is held by another rank."""
        if self.tree is None:
            return None
        key = ("local_parents",)
        if key not in self._steps:
            local = {g: i for i, g in enumerate(self.layout.token_index)}
            par = self.tree.structure.parents
            out = [-1 if par[g] < 0 else local.get(par[g], -2) for g in self.layout.token_index]
            self._steps[key] = torch.tensor(out, dtype=torch.int64, device=self.positions.device)[None]
        return self._steps[key]

    def lifetimes(self, causal: bool, device: torch.device, window: int | None = None):
        """Per ring step, the block's `Lifetimes` (None without a tree), and whether any key of the
        block is visible to any of its queries (a block hidden entirely is skipped), cached."""
        key = ("lifetimes", causal, str(device), window)
        if key not in self._steps:
            out = []
            for step in self.steps(causal, window):
                if self.tree is None or step.empty:
                    out.append((None, not step.empty))
                    continue
                q_rows, k_rows = step.rows(device)
                take = lambda t, rows: t.to(device) if rows is None else t.to(device).index_select(0, rows)  # noqa: E731
                life = Lifetimes(
                    take(self.tree.times[self.rank_in_group], q_rows),
                    take(self.tree.times[step.src], k_rows),
                    take(self.tree.pops[step.src], k_rows),
                )
                seg = step.seg
                any_visible = any(bool(life.allowed(a, b, c, e).any()) for a, b, c, e in zip(seg.cu_q, seg.cu_q[1:], seg.cu_k, seg.cu_k[1:]))
                out.append((life, any_visible))
            self._steps[key] = out
        return self._steps[key]


def make_shard_context(
    lengths, group_start: int, group_size: int, global_rank: int, device, kernel: str = "auto",
    structure: StackStructure | None = None, *, allow_empty_ranks: bool = False
) -> ShardContext:
    """The `ShardContext` of `global_rank` in group [group_start, group_start + group_size) for `lengths`.

    structure: the packed stack structure of the group's sequences (`hetsp.backspace.pack_structures`)
    when they hold `<bkspc>`; positions then are depths and attention sees ancestors only. None, or a
    structure without any `<bkspc>`, takes exactly the plain path.

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
    tree = None
    block_kernel = select_kernel(kernel, device)
    if structure is not None:
        if len(structure) != sum(lengths):
            raise ValueError(f"the stack structure covers {len(structure)} tokens but the group's sequences hold {sum(lengths)}")
        if not is_plain(structure):
            if not block_kernel.lifetime_mask:
                raise ValueError(
                    f"attention kernel {block_kernel.name!r} cannot express the ancestor mask of <bkspc> sequences; "
                    "use kernel='triton' (CUDA), 'torch_cpu' or 'reference'"
                )
            tree = _shard_tree(structure, layouts, device)
    positions = lay.positions if tree is None else tuple(structure.depths[g] for g in lay.token_index)
    return ShardContext(
        group_start=group_start,
        group_size=group_size,
        rank_in_group=global_rank - group_start,
        layout=lay,
        cu_seqlens=torch.tensor(lay.cu_seqlens, dtype=torch.int32, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        max_seqlen_local=lay.max_seqlen,
        kernel=block_kernel,
        layouts=layouts,
        tree=tree,
    )
