"""Hybrid SSM/attention causal LMs as Hugging Face models (`HybridConfig`, `HybridForCausalLM`).

Importing this package registers model_type "hetsp_hybrid" with AutoConfig /
AutoModelForCausalLM. Model definitions only: nothing here imports `hetsp`
(the runtime registers the family "hybrid" in `hetsp.model_families`).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import HybridCache
from .configuration_hybrid import MIXER_KINDS, HybridConfig
from .kernels import KERNELS
from .modeling_hybrid import HybridForCausalLM, HybridModel

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)


__all__ = [
    "KERNELS",
    "MIXER_KINDS",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridModel",
]
