"""`parallelize(model)`: make a model's SSM and conv layers sequence-parallel, from outside."""

from __future__ import annotations

import logging
import sys

from hetsp.ssm_parallel import hf_mamba2, hybrid
from hetsp.ssm_parallel.detect import check_supported

log = logging.getLogger(__name__)

_DONE_ATTR = "_hetsp_ssm_parallel"


def parallelize(model):
    """Install the sequence-parallel SSM/conv functions for every mixer of `model`; return `model`.

    Idempotent, and a no-op for models without SSM layers. Handled (an allow-list,
    `detect.py`): the s4d, ema, mamba2 and seqboat mixers of `models.HybridForCausalLM`
    (kernel overrides and hooks per mixer), and the Mamba-2 mixers of transformers' Bamba and
    GraniteMoeHybrid (their modeling file's ``causal_conv1d_fn`` / ``mamba2_chunk_scan`` swapped).
    Any other module with a recurrent state or a causal convolution (Jamba, Mamba, FalconMamba,
    LFM2, Qwen3-Next, ...) is a ValueError naming its class, raised before anything is changed.
    The swapped functions act only when the forward gets ``hetsp_shard``.
    """
    if getattr(model, _DONE_ATTR, False):
        return model
    kinds = set()
    for sub in check_supported(model):
        if hybrid.is_hybrid_mixer(sub):
            hybrid.parallelize_mixer(sub)
            kinds.add(sub.kind)
            continue
        cls = type(sub)
        mod = sys.modules.get(cls.__module__)
        if mod is None or not hf_mamba2.supports(mod):
            raise ValueError(f"{cls.__name__} is on hetsp's list of handled mixers but its modeling module {cls.__module__} lacks the functions hetsp swaps; update hetsp or transformers")
        hf_mamba2.patch_module(mod)
        kinds.add(cls.__name__)
    if kinds:
        log.info("sequence parallelism for %s: %s", type(model).__name__, ", ".join(sorted(kinds)))
    setattr(model, _DONE_ATTR, True)
    return model


def is_parallelized(model) -> bool:
    """Whether `parallelize` has prepared `model`."""
    return bool(getattr(model, _DONE_ATTR, False))
