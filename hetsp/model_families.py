"""Model families the runtime registers beyond llama: the hybrid models of `models/`, and
transformers' own hybrid Mamba-2/attention models.

The dependency is one way: this runtime module imports `models` (model
definitions only); `models` never imports `hetsp`.

``hybrid``: `models.HybridConfig` from a hetsp `ModelConfig`, the hybrid-only
fields in ``model.extra`` (layer_pattern, ...). ``bamba``: `transformers.BambaConfig`; ``granitemoehybrid``: a second Mamba-2
hybrid that ships in transformers. Both are built from a hetsp `ModelConfig`
(attention layers at ``model.extra["attn_layer_indices"]``, by default every
third layer starting at 1; Mamba-2 sizes from ``extra`` keys ``mamba_*``).
Their code is used as shipped: `hetsp.ssm_parallel.parallelize` swaps their
conv and scan functions, and the runtime's ``attn_implementation`` their
attention.
"""

from __future__ import annotations

from typing import Any

from hetsp.config import ConfigError, ModelConfig
from hetsp.model_registry import hf_config_kwargs, register_family

# Mamba-2 defaults for tiny models; any BambaConfig key in model.extra overrides them.
_MAMBA_DEFAULTS = {
    "mamba_n_heads": 4,
    "mamba_n_groups": 1,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_chunk_size": 64,
}


def _common(cfg: ModelConfig, vocab_size: int) -> dict[str, Any]:
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"model.hidden_size ({cfg.hidden_size}) must be divisible by model.num_heads ({cfg.num_heads})")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"model.num_heads ({cfg.num_heads}) must be divisible by model.num_kv_heads ({cfg.num_kv_heads})")
    extra = dict(cfg.extra)
    mamba = {k: extra.pop(k, v) for k, v in _MAMBA_DEFAULTS.items()}
    inner = mamba["mamba_expand"] * cfg.hidden_size
    if inner % mamba["mamba_n_heads"]:
        raise ConfigError(
            f"model.extra.mamba_n_heads ({mamba['mamba_n_heads']}) must divide mamba_expand * hidden_size ({inner})"
        )
    if mamba["mamba_n_heads"] % mamba["mamba_n_groups"]:
        raise ConfigError(
            f"model.extra.mamba_n_groups ({mamba['mamba_n_groups']}) must divide mamba_n_heads ({mamba['mamba_n_heads']})"
        )
    attn = extra.pop("attn_layer_indices", [i for i in range(cfg.num_layers) if i % 3 == 1])
    bad = [i for i in attn if not 0 <= i < cfg.num_layers]
    if bad:
        raise ConfigError(f"model.extra.attn_layer_indices {bad} outside 0..{cfg.num_layers - 1}")
    return dict(
        **hf_config_kwargs(cfg, vocab_size),
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        use_cache=False,
        pad_token_id=None,
        **mamba,
    ), attn, extra


def bamba_config(cfg: ModelConfig, vocab_size: int) -> Any:
    """A `BambaConfig` (Mamba-2 layers, attention at ``attn_layer_indices``)."""
    from transformers import BambaConfig

    kwargs, attn, extra = _common(cfg, vocab_size)
    return BambaConfig(attn_layer_indices=attn, num_logits_to_keep=None, **kwargs, **extra)


def granitemoehybrid_config(cfg: ModelConfig, vocab_size: int) -> Any:
    """A `GraniteMoeHybridConfig` with a dense MLP (``num_local_experts`` 0 unless set in extra)."""
    from transformers import GraniteMoeHybridConfig

    kwargs, attn, extra = _common(cfg, vocab_size)
    layer_types = ["attention" if i in attn else "mamba" for i in range(cfg.num_layers)]
    extra.setdefault("num_local_experts", 0)
    extra.setdefault("shared_intermediate_size", cfg.intermediate_size)
    return GraniteMoeHybridConfig(layer_types=layer_types, **kwargs, **extra)


# Keys of model.extra that map to differently named HybridConfig fields.
_EXTRA_ALIASES = {
    "ssm_state_size": "mamba_d_state",
    "window": "seqboat_window",
    "seqboat_w": "seqboat_window",
}


def hybrid_config(cfg: ModelConfig, vocab_size: int) -> Any:
    """hetsp ModelConfig -> `models.HybridConfig`; `cfg.extra` holds the hybrid-only fields."""
    from models import HybridConfig

    extra = {_EXTRA_ALIASES.get(k, k): v for k, v in dict(cfg.extra).items()}
    known = set(HybridConfig.__dataclass_fields__) if hasattr(HybridConfig, "__dataclass_fields__") else set()
    unknown = sorted(k for k in extra if known and k not in known)
    if unknown:
        raise ConfigError(f"model.extra: unknown key(s) {unknown} for the hybrid family")
    try:
        return HybridConfig(**hf_config_kwargs(cfg, vocab_size), rope_theta=cfg.rope_theta, **extra)
    except ValueError as err:
        raise ConfigError(f"model (family hybrid): {err}") from err


register_family("hybrid", hybrid_config)
register_family("bamba", bamba_config)
register_family("granitemoehybrid", granitemoehybrid_config)
