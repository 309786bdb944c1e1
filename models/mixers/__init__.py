"""Mixer kinds by name. Every mixer reads its sequence kernels from `mixer.kernels`, a ChainMap of
per-model overrides (`HybridForCausalLM.set_kernels`) over the live `models.kernels.KERNELS`."""

from __future__ import annotations

from collections import ChainMap

from torch import nn

from ..kernels import KERNELS
from .attention import AttentionMixer
from .ema import DampedEMA, EMAMixer
from .mamba2 import Mamba2Mixer
from .s4d import S4DMixer
from .seqboat import SeqBoatMixer

MIXERS: dict[str, type[nn.Module]] = {
    "attention": AttentionMixer,
    "s4d": S4DMixer,
    "ema": EMAMixer,
    "mamba2": Mamba2Mixer,
    "seqboat": SeqBoatMixer,
}


def build_mixer(kind: str, config, layer_idx: int) -> nn.Module:
    if kind not in MIXERS:
        raise ValueError(f"unknown mixer kind {kind!r}; valid kinds are {list(MIXERS)}")
    mixer = MIXERS[kind](config, layer_idx)
    mixer.kernels = ChainMap({}, KERNELS)
    return mixer


__all__ = ["MIXERS", "AttentionMixer", "DampedEMA", "EMAMixer", "Mamba2Mixer", "S4DMixer", "SeqBoatMixer", "build_mixer"]
