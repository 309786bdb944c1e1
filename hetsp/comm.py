"""Batched point-to-point exchanges on the default process group (the one p2p primitive of hetsp).

Groups of ranks exchange with isend/irecv pairs posted together, so no exchange can
deadlock and no group needs a communicator of its own. Empty messages are skipped
on both sides (both sides derive every size from the same shapes). Under gloo with
CUDA tensors (several simulated ranks sharing one GPU), messages are staged through
host memory, since gloo's point-to-point works on CPU tensors. Time blocked in
`Exchange.wait` is added to `hetsp.metrics.timing.COMM_WAIT` (the ``comm_s`` metric).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hetsp.metrics.timing import COMM_WAIT


def _stage_through_host(t: torch.Tensor) -> bool:
    return t.is_cuda and dist.get_backend() == "gloo"


class Exchange:
    """Posted sends and receives; `wait()` completes them (and copies staged receives back)."""

    def __init__(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], tag: int):
        ops, self._keep, self._copy_back = [], [], []
        for buf, peer in recvs:
            if buf.numel():
                target = buf
                if _stage_through_host(buf):
                    target = torch.empty(buf.shape, dtype=buf.dtype, device="cpu")
                    self._copy_back.append((buf, target))
                ops.append(dist.P2POp(dist.irecv, target, peer, tag=tag))
        for buf, peer in sends:
            if buf.numel():
                buf = buf.contiguous()
                if _stage_through_host(buf):
                    buf = buf.cpu()
                self._keep.append(buf)  # alive until the send completes
                ops.append(dist.P2POp(dist.isend, buf, peer, tag=tag))
        self._works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> None:
        with COMM_WAIT.measure():
            for w in self._works:
                w.wait()
            for dst, staged in self._copy_back:
                dst.copy_(staged)
        self._works, self._keep, self._copy_back = [], [], []
