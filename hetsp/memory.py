"""The per-rank memory model of a training run: one formula for the dry run and the planner.

Pure Python (no torch): the solver imports it. Bytes per rank =
model states under ZeRO + activation bytes per token x tokens held.

- Model states (AdamW, mixed precision in bf16): weights and gradients in the
  run's dtype, fp32 moments (8 bytes) and, in bf16, an fp32 master copy
  (4 bytes). ZeRO-1 shards the optimizer states over the ranks, ZeRO-2 also
  the gradients, ZeRO-3 also the weights.
- Activations per token per layer, in the run's dtype: the tensors a decoder
  layer keeps for backward with a fused attention kernel (no s^2 term):
  6h + 2 kv_dim + 3 I elements (norm inputs, q, k, v, attention output,
  residual, the three MLP projections). With activation checkpointing only
  each layer's input (h elements) stays, plus one layer recomputed at a time.
  Plus the fp32 logits, 4 V bytes per token. An estimate: where memory was
  measured, set cluster.tokens_per_rank instead.
- The parameter count is the dense decoder's (attention, gated MLP,
  embeddings and head); the dry run prints it next to the model's exact count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"bf16": 2, "fp32": 4}


def run_dtype(train_dtype: str, on_gpu: bool) -> str:
    """"bf16" or "fp32": the dtype a run trains in (train.dtype "auto": bf16 on GPU, fp32 on CPU)."""
    if train_dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.dtype = {train_dtype!r}: choose 'auto', 'bf16' or 'fp32'")
    if train_dtype == "auto":
        return "bf16" if on_gpu else "fp32"
    return train_dtype


def dense_param_count(layers: int, hidden: int, kv_dim: int, intermediate: int, vocab: int) -> int:
    """Parameters of a dense decoder: per layer q/o (h x h each), k/v (h x kv_dim each) and a
    gated MLP (3 h I); embeddings and an untied head (2 h V)."""
    return layers * (hidden * (hidden + 2 * kv_dim) + hidden * hidden + 3 * hidden * intermediate) + 2 * hidden * vocab


@dataclass(frozen=True)
class MemoryModel:
    """Per-rank memory of one run (see the module docstring for the formula)."""

    num_params: float
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    vocab: int
    zero_stage: int
    world_size: int
    dtype: str  # "bf16" or "fp32"
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"memory model: dtype {self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"memory model: ZeRO stage {self.zero_stage} is not 0..3")
        if self.world_size < 1:
            raise ValueError(f"memory model: world size {self.world_size} < 1")

    @classmethod
    def for_run(cls, model: Any, vocab: int, world_size: int, zero_stage: int, dtype: str,
                activation_checkpointing: bool = False) -> "MemoryModel":
        """From a hetsp `ModelConfig` (its shape), the vocabulary and the run's training settings."""
        kv_heads = model.num_kv_heads or model.num_heads
        kv_dim = kv_heads * (model.hidden_size // model.num_heads)
        params = dense_param_count(model.num_layers, model.hidden_size, kv_dim, model.intermediate_size, vocab)
        return cls(params, model.num_layers, model.hidden_size, kv_dim, model.intermediate_size, vocab,
                   int(zero_stage), int(world_size), dtype, bool(activation_checkpointing))

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def state_bytes_per_rank(self) -> float:
        """Weights, gradients and AdamW states per rank under ZeRO-`zero_stage`."""
        weights = grads = self.element_bytes
        optim = 12 if self.dtype == "bf16" else 8  # (fp32 master copy) + two fp32 moments
        n = self.world_size
        if self.zero_stage >= 3:
            per_param = (weights + grads + optim) / n
        elif self.zero_stage == 2:
            per_param = weights + (grads + optim) / n
        elif self.zero_stage == 1:
            per_param = weights + grads + optim / n
        else:
            per_param = weights + grads + optim
        return self.num_params * per_param

    def activation_bytes_per_token(self) -> float:
        """Activation bytes one token costs on the rank that holds it."""
        layer = (6 * self.hidden + 2 * self.kv_dim + 3 * self.intermediate) * self.element_bytes
        if self.activation_checkpointing:
            body = self.layers * self.hidden * self.element_bytes + layer
        else:
            body = self.layers * layer
        return body + 4 * self.vocab

    def bytes_per_rank(self, tokens: int) -> float:
        """Model states plus the activations of `tokens` tokens."""
        return self.state_bytes_per_rank() + self.activation_bytes_per_token() * tokens

    def tokens_per_rank(self, memory_bytes: float) -> int:
        """Most tokens a rank with `memory_bytes` can hold (may be <= 0: the states alone do not fit)."""
        return math.floor((memory_bytes - self.state_bytes_per_rank()) / self.activation_bytes_per_token())
