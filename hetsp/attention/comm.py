"""Point-to-point ring exchange on the default process group.

A group is the contiguous global ranks [group_start, group_start + group_size); sends
go to the next rank of the group, receives come from the previous one. Every exchange
is one batched isend/irecv pair (`hetsp.comm.Exchange`), so the ring cannot deadlock
and groups need no communicator of their own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hetsp.comm import Exchange

# Distinct tags keep the K/V stream and the travelling gradient stream apart (gloo matches by tag).
TAG_KV = 17
TAG_DKV = 18


class RingExchange:
    """Send `send` to the next rank and receive a tensor of `recv_shape` from the previous one."""

    def __init__(self, group_start: int, group_size: int, rank_in_group: int):
        self.next = group_start + (rank_in_group + 1) % group_size
        self.prev = group_start + (rank_in_group - 1) % group_size

    def start(self, send: torch.Tensor, recv_shape: tuple[int, ...], tag: int) -> "_Pending":
        recv = torch.empty(recv_shape, dtype=send.dtype, device=send.device)
        return _Pending(Exchange([(send, self.next)], [(recv, self.prev)], tag), recv)


class _Pending:
    def __init__(self, exchange: Exchange, recv: torch.Tensor):
        self._exchange = exchange
        self._recv = recv

    def wait(self) -> torch.Tensor:
        self._exchange.wait()
        return self._recv


def warm_up(device) -> None:
    """One world collective so that later point-to-point exchanges of single groups can start.

    Under NCCL, when batch_isend_irecv is the first call on a communicator every rank of it
    must take part; call this once on every rank at start-up (harmless under gloo).
    """
    if dist.is_initialized():
        t = torch.zeros(1, device=device)
        dist.all_reduce(t)
