"""Which device and process-group backend each rank gets, and how many CPU threads.

The arrangements (one line of the launcher's log says which one runs and why):

- no GPU: every rank on "cpu", backend gloo.
- simulated ranks <= GPUs: rank r on "cuda:r", backend nccl.
- simulated ranks > GPUs (e.g. N ranks on one GPU): rank r on "cuda:(r mod GPUs)", backend gloo.
  NCCL refuses two ranks of one communicator on the same device, so the ranks
  share the GPU for compute and talk through gloo; a rank must hand gloo only
  collectives it supports on CUDA tensors, staging the others through CPU.
- torchrun: HETSP_DEVICE "cuda" (cuda:LOCAL_RANK mod GPUs) with nccl when each rank
  has its own GPU, gloo when ranks per node exceed GPUs; "cpu" and gloo without GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Arrangement:
    devices: tuple[str, ...]  # HETSP_DEVICE per local rank
    backend: str  # HETSP_DIST_BACKEND: "gloo" | "nccl"
    reason: str  # one line for the log


def count_gpus(device: str) -> int:
    """Visible CUDA devices for ``--device`` auto|cpu|cuda (imports torch only for auto/cuda)."""
    if device == "cpu":
        return 0
    import torch

    num = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and num == 0:
        raise ValueError("--device cuda but torch sees no CUDA device: use --device cpu or auto")
    return num


def simulated_arrangement(num_ranks: int, num_gpus: int) -> Arrangement:
    """Devices and backend for `num_ranks` ranks on one host with `num_gpus` GPUs."""
    if num_gpus == 0:
        return Arrangement(("cpu",) * num_ranks, "gloo", "no GPU: ranks on CPU, gloo")
    devices = tuple(f"cuda:{r % num_gpus}" for r in range(num_ranks))
    if num_ranks <= num_gpus:
        return Arrangement(devices, "nccl", f"{num_ranks} rank(s) on {num_gpus} GPU(s), one GPU each: nccl")
    return Arrangement(
        devices,
        "gloo",
        f"{num_ranks} ranks share {num_gpus} GPU(s): NCCL refuses two ranks on one device, "
        "so compute stays on the GPU and communication goes through gloo",
    )


def torchrun_arrangement(nproc_per_node: int, num_gpus: int) -> Arrangement:
    """Devices and backend when torchrun starts `nproc_per_node` ranks on each node."""
    if num_gpus == 0:
        return Arrangement(("cpu",), "gloo", "no GPU on this node: ranks on CPU, gloo")
    if nproc_per_node <= num_gpus:
        return Arrangement(("cuda",), "nccl", f"{nproc_per_node} rank(s) per node on {num_gpus} GPU(s): nccl")
    return Arrangement(
        ("cuda",),
        "gloo",
        f"{nproc_per_node} ranks per node share {num_gpus} GPU(s): NCCL refuses two ranks on one device, gloo",
    )


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(ranks_on_host: int, cores: int | None = None) -> int:
    """OMP_NUM_THREADS for each of `ranks_on_host` ranks: the host's cores split evenly, at least 1."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, ranks_on_host))
