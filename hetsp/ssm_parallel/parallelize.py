"""`parallelize(model)`: make a model's SSM and conv layers sequence-parallel, from outside."""

from __future__ import annotations

import logging
import sys

from hetsp.ssm_parallel import hf_mamba2, hybrid

log = logging.getLogger(__name__)

_DONE_ATTR = "_hetsp_ssm_parallel"


def parallelize(model):
    """Install the sequence-parallel SSM/conv functions for every mixer of `model`; return `model`.

    Idempotent, and a no-op for models without SSM layers. Recognised:
    the s4d, ema, mamba2 and seqboat mixers of `models.HybridForCausalLM`
    (kernel overrides and hooks per mixer), and transformers' Mamba-2 hybrids whose modeling file exposes
    ``causal_conv1d_fn`` / ``mamba2_chunk_scan`` (Bamba, GraniteMoeHybrid).
    The swapped functions act only when the forward gets ``hetsp_shard``.
    """
    if getattr(model, _DONE_ATTR, False):
        return model
    kinds = set()
    for sub in model.modules():
        if hybrid.is_hybrid_mixer(sub):
            hybrid.parallelize_mixer(sub)
            kinds.add(sub.kind)
            continue
        cls = type(sub)
        mod = sys.modules.get(cls.__module__)
        if mod is not None and hasattr(sub, "conv1d") and hasattr(sub, "A_log") and hf_mamba2.supports(mod):
            hf_mamba2.patch_module(mod)
            kinds.add(cls.__name__)
    if kinds:
        log.info("sequence parallelism for %s: %s", type(model).__name__, ", ".join(sorted(kinds)))
    setattr(model, _DONE_ATTR, True)
    return model
