"""DeepSpeed ZeRO over all ranks: optimizer, warmup + cosine schedule, precision.

The number of micro-batches changes from step to step (it is whatever the
plan says), so DeepSpeed runs with gradient_accumulation_steps = 1 and the
executor marks the accumulation boundary itself before every backward.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from hetsp.config import TrainConfig

log = logging.getLogger("hetsp.engine")


def resolve_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    if train.dtype == "fp32" or (train.dtype == "auto" and device.type != "cuda"):
        return torch.float32
    return torch.bfloat16


def lr_lambda(train: TrainConfig):
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `steps`."""
    warmup = max(0, train.warmup_steps)
    total = max(1, train.steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(train: TrainConfig, world_size: int, dtype: torch.dtype) -> dict[str, Any]:
    if train.zero_stage not in (1, 2, 3):
        raise ValueError(f"train.zero_stage must be 1, 2 or 3, got {train.zero_stage}")
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": {"stage": train.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, train: TrainConfig, world_size: int, device: torch.device) -> Any:
    """Wrap `model` in a DeepSpeed engine with AdamW and the warmup + cosine schedule."""
    import deepspeed

    dtype = resolve_dtype(train, device)
    model.to(device)
    if train.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"train.activation_checkpointing: {type(model).__name__} does not support it; set it to false")
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), eps=train.adam_eps, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(train, world_size, dtype),
    )
    log.info("DeepSpeed ZeRO-%d, %s, %d ranks", train.zero_stage, str(dtype).replace("torch.", ""), world_size)
    return engine
