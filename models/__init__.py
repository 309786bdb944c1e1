"""Hybrid SSM/attention causal LMs as Hugging Face models (`HybridConfig`, `HybridForCausalLM`).

Importing this package registers model_type "hetsp_hybrid" with AutoConfig /
AutoModelForCausalLM and the family "hybrid" in `hetsp.model_registry`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import HybridCache
from .configuration_hybrid import MIXER_KINDS, HybridConfig
from .kernels import KERNELS
from .modeling_hybrid import HybridForCausalLM, HybridModel

# Keys of model.extra that map to differently named HybridConfig fields.
_EXTRA_ALIASES = {
    "ssm_state_size": "mamba_d_state",
    "window": "seqboat_window",
    "seqboat_w": "seqboat_window",
}


def hybrid_config_from_model_config(cfg, vocab_size: int) -> HybridConfig:
    """hetsp ModelConfig -> HybridConfig; `cfg.extra` holds the hybrid-only fields (layer_pattern, ...)."""
    from hetsp.config import ConfigError

    extra = {_EXTRA_ALIASES.get(k, k): v for k, v in dict(cfg.extra).items()}
    known = set(HybridConfig.__dataclass_fields__) if hasattr(HybridConfig, "__dataclass_fields__") else set()
    unknown = sorted(k for k in extra if known and k not in known)
    if unknown:
        raise ConfigError(f"model.extra: unknown key(s) {unknown} for the hybrid family")
    try:
        return _build(cfg, vocab_size, extra)
    except ValueError as err:
        raise ConfigError(f"model (family hybrid): {err}") from err


def _build(cfg, vocab_size: int, extra: dict) -> HybridConfig:
    from hetsp.model_registry import hf_config_kwargs

    return HybridConfig(**hf_config_kwargs(cfg, vocab_size), rope_theta=cfg.rope_theta, **extra)


AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

try:  # the runtime registry is optional for users of the models alone
    from hetsp.model_registry import register_family
except ImportError:  # pragma: no cover
    register_family = None
if register_family is not None:
    register_family("hybrid", hybrid_config_from_model_config)

__all__ = [
    "KERNELS",
    "MIXER_KINDS",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridModel",
    "hybrid_config_from_model_config",
]
