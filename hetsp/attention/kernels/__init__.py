"""Local block kernels behind one interface (see `base`), and the choice among them."""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache

import torch

from .base import BlockKernel, Segments, acc_dtype
from .reference import REFERENCE_KERNEL
from .torch_cpu import TORCH_CPU_KERNEL

logger = logging.getLogger("hetsp.attention")

KERNEL_NAMES = ("auto", "torch_cpu", "flash_attn", "triton", "torch_flash", "reference")

__all__ = ["BlockKernel", "Segments", "acc_dtype", "select_kernel", "kernel_for_config", "KERNEL_NAMES"]


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@lru_cache(maxsize=None)
def _log_choice(name: str, reason: str) -> None:
    logger.info("attention block kernel: %s (%s)", name, reason)


def _load(name: str) -> BlockKernel:
    if name == "torch_cpu":
        return TORCH_CPU_KERNEL
    if name == "reference":
        return REFERENCE_KERNEL
    if name == "flash_attn":
        from .flash import FLASH_ATTN_KERNEL

        return FLASH_ATTN_KERNEL
    if name == "torch_flash":
        from .torch_flash import TORCH_FLASH_KERNEL

        return TORCH_FLASH_KERNEL
    from .triton_kernel import TRITON_KERNEL

    return TRITON_KERNEL


def kernel_for_config(attention, device: torch.device | str) -> BlockKernel | str:
    """What `select_kernel` should get for an `AttentionConfig`: its kernel name, or, when
    Triton tile sizes are set (`triton_block_m`/`triton_block_n`, 0 = the kernel's default),
    the Triton kernel built with them (ValueError if they are set for another kernel)."""
    bm, bn = attention.triton_block_m, attention.triton_block_n
    if not bm and not bn:
        return attention.kernel
    chosen = select_kernel(attention.kernel, device)
    if chosen.name != "triton":
        raise ValueError(f"attention.triton_block_m/n are set but the attention kernel is {chosen.name!r}; "
                         "set attention.kernel = \"triton\" or leave the block sizes at 0")
    from .triton_kernel import triton_kernel

    kernel = triton_kernel(bm or None, bn or None)
    _log_choice(kernel.name, f"tiles {bm}x{bn} from attention.triton_block_m/n")
    return kernel


def select_kernel(name: str | BlockKernel, device: torch.device | str) -> BlockKernel:
    """The block kernel for `name` on `device`; "auto" picks by device and logs why (once).

    A `BlockKernel` (e.g. the Triton kernel with chosen tiles, see `kernel_for_config`) is returned as is.
    """
    device = torch.device(device)
    if isinstance(name, BlockKernel):
        return name
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of {KERNEL_NAMES}")
    if name == "auto":
        if device.type == "cuda":
            if _flash_attn_installed():
                name, reason = "flash_attn", "auto: CUDA device and flash-attn is installed"
            else:
                name, reason = "triton", "auto: CUDA device, flash-attn is not installed"
        else:
            name, reason = "torch_cpu", f"auto: {device.type} device"
    else:
        reason = "requested"
    if name == "flash_attn" and not _flash_attn_installed():
        raise ValueError("attention kernel 'flash_attn' requested but flash-attn is not installed; install flash-attn or use kernel='auto'")
    if name == "flash_attn" and device.type != "cuda":
        raise ValueError(f"attention kernel 'flash_attn' needs a CUDA device, got {device}; use kernel='auto'")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention kernel 'triton' needs a CUDA device (got {device}) or TRITON_INTERPRET=1 set before triton is imported")
    if name == "torch_flash" and device.type != "cuda":
        raise ValueError(f"attention kernel 'torch_flash' needs a CUDA device, got {device}; use kernel='auto'")
    if name == "torch_cpu" and device.type != "cpu":
        raise ValueError(f"attention kernel 'torch_cpu' runs on CPU tensors only, got {device}; use kernel='auto'")
    kernel = _load(name)
    _log_choice(kernel.name, reason)
    return kernel
