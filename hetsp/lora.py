"""LoRA through `peft`: ``[lora]`` r, alpha, dropout, target_modules.

The adapted model keeps the base model's modules (peft wraps the targeted
linear layers in place), so ring attention (the attention implementation in
the model's config) and SSM state passing (`hetsp.ssm_parallel.parallelize`,
applied after this) find their layers as before. Only adapter parameters
require gradients; the optimizer and checkpoints see only them.
"""

from __future__ import annotations

import logging
from typing import Any

from hetsp.config import LoraConfig

log = logging.getLogger("hetsp.lora")


def lora_enabled(lora: LoraConfig) -> bool:
    return lora.r > 0


def check_lora_config(lora: LoraConfig) -> None:
    if lora.r < 0:
        raise ValueError(f"lora.r = {lora.r}: must be >= 1 (or 0 to train every parameter)")
    if lora_enabled(lora):
        if not lora.target_modules:
            raise ValueError("lora.target_modules is empty; name the linear layers to adapt (e.g. [\"q_proj\", \"v_proj\"])")
        if not 0.0 <= lora.dropout < 1.0:
            raise ValueError(f"lora.dropout = {lora.dropout}: must be in [0, 1)")


def peft_config(lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """`model` with LoRA adapters on `lora.target_modules` (unchanged when ``lora.r == 0``)."""
    check_lora_config(lora)
    if not lora_enabled(lora):
        return model
    import torch
    from peft import get_peft_model

    linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in lora.target_modules if t not in linear_names]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} name no linear layer of {type(model).__name__}; "
            f"its linear layers are {sorted(linear_names)}"
        )
    adapted = get_peft_model(model, peft_config(lora))
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in adapted.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %s: %.3fM trainable parameters", lora.r, lora.alpha,
             ",".join(lora.target_modules), trainable / 1e6)
    return adapted


def has_frozen_parameters(model: Any) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def lora_model_for_export(cfg: Any, state: dict[str, Any], merge: bool) -> Any:
    """The base model of `cfg.model.init_from` with the adapter weights of `state` (consolidated from a
    LoRA run's checkpoint, trained parameters only): merged into a plain model, or the peft model."""
    from hetsp.loading import load_pretrained
    from hetsp.config import TrainConfig

    import torch

    base = load_pretrained(cfg.model, TrainConfig(zero_stage=1, dtype="fp32"), 1, torch.device("cpu"), None)
    model = apply_lora(base, cfg.lora)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if set(state) != names:
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        raise ValueError(
            f"the checkpoint's trained parameters do not match the LoRA adapter of the config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}. Was it written by this run's config ([lora], model.init_from)?"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    if merge:
        return model.merge_and_unload()
    model.peft_config["default"].base_model_name_or_path = str(cfg.model.init_from)
    return model
