"""Differentiable exchanges inside one group of ranks.

A group is the contiguous range of global ranks ``[start, start + size)``.
Every exchange is point to point on the default communicator (batched
isend/irecv), so no sub-communicator is ever created; the backward of each
exchange is its mirror image. All ranks of a group must call every exchange
in the same order, whatever their data (a rank with no tokens sends and
receives empty-but-shaped payloads): callers never branch on local data
around these calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetsp.comm import Exchange
from hetsp.ssm_parallel.segments import HaloRoutes


# Tags of the exchanges here (gloo matches messages by peer and tag): distinct from ring
# attention's, so two streams can never take each other's messages.
TAG_GATHER = 41
TAG_GATHER_GRAD = 42
TAG_HALO = 43
TAG_HALO_GRAD = 44


@dataclass(frozen=True)
class GroupSpec:
    """The group as a value: global ranks start .. start + size - 1, this rank's index in it."""

    start: int
    size: int
    rank: int

    def global_rank(self, rank_in_group: int) -> int:
        return self.start + rank_in_group

    @classmethod
    def of(cls, shard) -> "GroupSpec":
        """From a `hetsp.attention.ShardContext` (group_start, group_size, rank_in_group)."""
        return cls(int(shard.group_start), int(shard.group_size), int(shard.rank_in_group))


def _p2p(group: GroupSpec, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], tag: int) -> None:
    """Post all sends and receives (peers are ranks in group) at once and wait for them."""
    Exchange(
        [(buf, group.global_rank(peer)) for peer, buf in sends.items()],
        [(buf, group.global_rank(peer)) for peer, buf in recvs.items()],
        tag,
    ).wait()


def _all_gather(x: torch.Tensor, group: GroupSpec) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((group.size, *x.shape))
    out[group.rank] = x
    peers = [p for p in range(group.size) if p != group.rank]
    _p2p(group, {p: x for p in peers}, {p: out[p] for p in peers}, TAG_GATHER)
    return out


def _reduce_scatter(y: torch.Tensor, group: GroupSpec) -> torch.Tensor:
    """Sum over ranks of each rank's slice `y[r]` for this rank: the mirror of `_all_gather`."""
    y = y.contiguous()
    peers = [p for p in range(group.size) if p != group.rank]
    bufs = {p: torch.empty_like(y[0]) for p in peers}
    _p2p(group, {p: y[p] for p in peers}, bufs, TAG_GATHER_GRAD)
    out = y[group.rank].clone()
    for p in peers:
        out += bufs[p]
    return out


class _GroupAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


def group_all_gather(x: torch.Tensor, group: GroupSpec) -> torch.Tensor:
    """``[*S] -> [group.size, *S]``: every rank's `x` (same shape on all ranks), differentiable."""
    if group.size == 1:
        return x.unsqueeze(0)
    return _GroupAllGather.apply(x, group)


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TC, routes, group):
        ctx.routes, ctx.group, ctx.num_tokens = routes, group, x_TC.shape[0]
        x_TC = x_TC.contiguous()
        num_ch = x_TC.shape[1]
        halo = x_TC.new_zeros((routes.num_rows, num_ch))
        sends = {dst: x_TC[list(idx)] for dst, idx in routes.send.items()}
        recvs = {src: x_TC.new_empty((len(rows), num_ch)) for src, rows in routes.recv.items() if src != group.rank}
        _p2p(group, sends, recvs, TAG_HALO)
        for src, rows in routes.recv.items():
            dst_rows = [r for r, _ in rows]
            halo[dst_rows] = x_TC[[i for _, i in rows]] if src == group.rank else recvs[src]
        return halo

    @staticmethod
    def backward(ctx, grad_halo):
        routes, group = ctx.routes, ctx.group
        grad_halo = grad_halo.contiguous()
        num_ch = grad_halo.shape[1]
        grad_x = grad_halo.new_zeros((ctx.num_tokens, num_ch))
        # Mirror image: each halo row's gradient goes back to the rank it came from.
        sends = {src: grad_halo[[r for r, _ in rows]] for src, rows in routes.recv.items() if src != group.rank}
        recvs = {dst: grad_halo.new_empty((len(idx), num_ch)) for dst, idx in routes.send.items()}
        _p2p(group, sends, recvs, TAG_HALO_GRAD)
        own = routes.recv.get(group.rank, ())
        if own:
            grad_x.index_add_(0, torch.tensor([i for _, i in own], device=grad_x.device), grad_halo[[r for r, _ in own]])
        for dst, idx in routes.send.items():
            grad_x.index_add_(0, torch.tensor(idx, device=grad_x.device), recvs[dst])
        return grad_x, None, None


def halo_exchange(x_TC: torch.Tensor, routes: HaloRoutes, group: GroupSpec) -> torch.Tensor:
    """``[T, C] -> [routes.num_rows, C]``: the tokens before each local segment (zeros at document starts).

    Gradients of the halo rows are sent back to and accumulated on the ranks that hold those tokens.
    """
    return _HaloExchange.apply(x_TC, routes, group)
