"""What the current device is called and how much memory a rank has used at most.

torch is imported inside the functions so that `hetsp.metrics` stays light.
"""

from __future__ import annotations

import resource
import sys
from typing import Any


def device_name(device: Any) -> str | None:
    """The marketing name of a CUDA/ROCm device ("NVIDIA H100 80GB HBM3"); None for CPU.

    `device` may be a torch.device, a string such as "cuda:1", or already a
    device name (returned unchanged).
    """
    if device is None:
        return None
    if isinstance(device, str) and not device.startswith(("cuda", "cpu", "meta", "mps")):
        return device
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(index)


def peak_memory_bytes(device: Any) -> int:
    """Peak memory of this rank so far: allocated tensor bytes on CUDA, peak resident set size on CPU.

    On CPU the figure covers the whole process (Python, libraries, data), not only tensors.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes
