"""Model families by name: `build_model(model_cfg, vocab_size)` for the runtime.

A family is a function ``(ModelConfig, vocab_size) -> transformers PretrainedConfig``;
the model itself is built with ``AutoModelForCausalLM.from_config``, so any
causal LM that transformers knows (stock or registered by `models/`) works.
Families register lazily so that importing this module stays light.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from hetsp.config import ConfigError, ModelConfig

ConfigBuilder = Callable[[ModelConfig, int], Any]
_FAMILIES: dict[str, ConfigBuilder] = {}
# Families provided by other modules, imported on first use: name -> module that registers it.
# `models` holds model definitions only and never imports hetsp; the runtime registers them.
_LAZY: dict[str, str] = {name: "hetsp.model_families" for name in ("hybrid", "bamba", "granitemoehybrid")}


def register_family(name: str, builder: ConfigBuilder) -> None:
    _FAMILIES[name] = builder


def family_names() -> list[str]:
    return sorted(set(_FAMILIES) | set(_LAZY))


def hf_config_kwargs(cfg: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """The shape fields of `cfg` under their transformers names (shared by every family)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )


def _llama(cfg: ModelConfig, vocab_size: int) -> Any:
    from transformers import LlamaConfig

    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"model.hidden_size ({cfg.hidden_size}) must be divisible by model.num_heads ({cfg.num_heads})")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"model.num_heads ({cfg.num_heads}) must be divisible by model.num_kv_heads ({cfg.num_kv_heads})")
    return LlamaConfig(**hf_config_kwargs(cfg, vocab_size), rope_theta=cfg.rope_theta, **cfg.extra)


register_family("llama", _llama)


def build_hf_config(cfg: ModelConfig, vocab_size: int) -> Any:
    """The transformers config of the model `cfg` describes (the checkpoint's with `model.init_from`)."""
    if cfg.init_from:
        from hetsp.loading import checkpoint_hf_config

        return checkpoint_hf_config(cfg)
    if cfg.family not in _FAMILIES and cfg.family in _LAZY:
        importlib.import_module(_LAZY[cfg.family])
    if cfg.family not in _FAMILIES:
        raise ConfigError(f"model.family: unknown family {cfg.family!r}; known: {family_names()}")
    return _FAMILIES[cfg.family](cfg, vocab_size)


def build_model(cfg: ModelConfig, vocab_size: int, attn_implementation: str | None = None, device: Any = None) -> Any:
    """A randomly initialised causal LM (on `device`, e.g. "meta" for a dry run)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_cfg = build_hf_config(cfg, vocab_size)
    if attn_implementation is not None:
        hf_cfg._attn_implementation = attn_implementation
    with torch.device(device or "cpu"):
        return AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn_implementation)
