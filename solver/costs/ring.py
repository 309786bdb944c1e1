"""hetsp's ring-attention cost model, analytic from the model's shape and the hardware.

For one sequence of s tokens on a group of d ranks (bf16, every layer attention):
- compute: (3 * F_lin * s + 7 * L * h * s^2) / d / (peak * efficiency), where
  F_lin = 2 * (h * (h + 2 kvd) + h * h + 3 h I) per layer + 2 h V (forward FLOPs per token;
  backward twice that), and causal attention costs 2 h s^2 forward per layer, 2.5x that backward;
- ring (d > 1): d - 1 steps per layer, forward and backward. A step sends K and V of
  s/d tokens (2 * (s/d) * kvd * 2 bytes forward, about 4x that backward with the fp32
  dK/dV travelling with the block) while computing one balanced (zigzag) block,
  2 h (s/d)^2 FLOPs forward, 2.5x backward. Exposed time per step = max(0, transfer - compute).
  Links: intra-node bandwidth when the group fits in a node, else inter-node.
- every group pays a message latency per ring step (2 (d - 1) L latencies), once per group.
Sequences packed in one group share each step's transfer and compute, so the exposed
time of a group is max(0, sum of transfers - sum of computes) per step: less than the
sum of per-sequence maxima that `seq_time` adds (the MILP's upper bound).
Memory: `cluster.tokens_per_rank` tokens per rank, or, when `cluster.memory_per_rank_gb`
is set, `hetsp.memory.MemoryModel.tokens_per_rank` (the formula the dry run prints), from
``planner.options`` "zero_stage" (default 1), "dtype" (default "bf16") and
"activation_checkpointing" (default false), which the runtime and ``hetsp-plan --config``
fill in from the train section. K/V travel in the run's dtype.
The fixed cost per micro-batch is the ZeRO collectives repeated per micro-batch
(stage 2: gradient reduce-scatter; stage 3: plus two parameter all-gathers), from
``planner.options["zero_stage"]`` (default 1: nothing per micro-batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from hetsp.memory import DTYPE_BYTES, MemoryModel, dense_param_count

from .base import CostModel


@dataclass(frozen=True)
class RingHardware:
    peak_flops: float  # achievable FLOP/s per rank (peak x efficiency)
    intra_bps: float  # bytes/s
    inter_bps: float
    ranks_per_node: int  # 0: one node
    latency_s: float


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def params(self) -> float:
        return dense_param_count(self.layers, self.hidden, self.kv_dim, self.intermediate, self.vocab)


class RingCostModel(CostModel):
    name = "ring"
    additive = False

    def __init__(
        self,
        shape: ModelShape,
        hw: RingHardware,
        num_ranks: int,
        tokens_per_rank: int,
        zero_stage: int = 1,
        source: dict[str, Any] | None = None,
        dtype: str = "bf16",
    ) -> None:
        if tokens_per_rank < 1:
            raise ValueError(f"ring cost model: no room for activations ({tokens_per_rank} tokens per rank)")
        self.shape, self.hw, self.num_ranks = shape, hw, num_ranks
        self.tokens_per_rank = tokens_per_rank
        self.zero_stage = zero_stage
        self.source = source or {}
        h, kvd, I, V, L = shape.hidden, shape.kv_dim, shape.intermediate, shape.vocab, shape.layers
        self._lin = 3 * (2 * L * (h * (h + 2 * kvd) + h * h + 3 * h * I) + 2 * h * V)  # FLOPs/token fwd+bwd
        self._attn = 7.0 * L * h  # FLOPs per token^2, fwd + bwd, causal
        self._kv_bytes = 2 * kvd * DTYPE_BYTES[dtype]  # K and V per token, in the run's dtype
        self.dtype = dtype

    @classmethod
    def from_configs(
        cls, model, cluster, num_ranks: int, zero_stage: int = 1, dtype: str = "bf16", activation_checkpointing: bool = False
    ) -> "RingCostModel":
        vocab = model.vocab_size or 32000
        shape = ModelShape(
            model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads or model.num_heads,
            model.intermediate_size, vocab,
        )
        hw = RingHardware(
            cluster.peak_tflops * 1e12 * cluster.compute_efficiency,
            cluster.intra_node_gbps * 1e9,
            cluster.inter_node_gbps * 1e9,
            cluster.ranks_per_node,
            cluster.link_latency_us * 1e-6,
        )
        if cluster.memory_per_rank_gb > 0:
            mem = MemoryModel.for_run(model, vocab, num_ranks, zero_stage, dtype, activation_checkpointing)
            tpr = mem.tokens_per_rank(cluster.memory_per_rank_gb * 2**30)
            mem_src = (
                f"{cluster.memory_per_rank_gb} GB per rank: {mem.state_bytes_per_rank() / 2**30:.2f} GiB model states "
                f"(ZeRO-{zero_stage}, {dtype}), {mem.activation_bytes_per_token():.0f} bytes/token estimated"
            )
        else:
            tpr = cluster.tokens_per_rank
            mem_src = "cluster.tokens_per_rank"
        src = {"vocab": vocab if model.vocab_size else f"{vocab} (model.vocab_size = 0: assumed)", "memory": mem_src}
        return cls(shape, hw, num_ranks, tpr, zero_stage, src, dtype)

    @property
    def _flops(self) -> float:
        """Achievable FLOP/s per rank; times need it, the memory budget (`capacity`) does not."""
        if self.hw.peak_flops <= 0:
            raise ValueError(
                "the ring cost model needs cluster.peak_tflops (the device's peak bf16 TFLOP/s) for times; set it, "
                "or use planner.cost_model = 'profile' with a measured table"
            )
        return self.hw.peak_flops

    # ---- pieces ---------------------------------------------------------------
    def _bw(self, d: int) -> float:
        rpn = self.hw.ranks_per_node
        return self.hw.intra_bps if rpn == 0 or d <= rpn else self.hw.inter_bps

    def compute_s(self, s: int, d: int) -> float:
        return (self._lin * s + self._attn * s * s) / d / self._flops

    def _steps(self, s: int, d: int) -> tuple[float, float, float, float]:
        """Per ring step: (forward transfer, forward block compute, backward transfer, backward compute) seconds."""
        blk = s / d
        bw = self._bw(d)
        cf = self._kv_bytes * blk / bw
        pf = 2.0 * self.shape.hidden * blk * blk / self._flops
        return cf, pf, 4.0 * cf, 2.5 * pf

    def seq_comm(self, s: int, d: int) -> float:
        if d == 1:
            return 0.0
        cf, pf, cb, pb = self._steps(s, d)
        return self.shape.layers * (d - 1) * (max(0.0, cf - pf) + max(0.0, cb - pb))

    def seq_time(self, s: int, d: int) -> float:
        return self.compute_s(s, d) + self.seq_comm(s, d)

    def group_overhead_s(self, d: int) -> float:
        return 0.0 if d == 1 else 2 * self.shape.layers * (d - 1) * self.hw.latency_s

    def group_breakdown(self, lengths: Sequence[int], d: int) -> dict[str, float]:
        if not lengths:
            return {"compute_s": 0.0, "comm_s": 0.0}
        comp = sum(self.compute_s(s, d) for s in lengths)
        if d == 1:
            return {"compute_s": comp, "comm_s": 0.0}
        cf = pf = cb = pb = 0.0
        for s in lengths:
            a, b, c, e = self._steps(s, d)
            cf, pf, cb, pb = cf + a, pf + b, cb + c, pb + e
        comm = self.shape.layers * (d - 1) * (max(0.0, cf - pf) + max(0.0, cb - pb)) + self.group_overhead_s(d)
        return {"compute_s": comp, "comm_s": comm}

    @property
    def fixed_s(self) -> float:
        if self.zero_stage < 2 or self.num_ranks == 1:
            return 0.0
        n = self.num_ranks
        ring_bytes = 2 * self.shape.params * (n - 1) / n
        bw = self.hw.inter_bps if 0 < self.hw.ranks_per_node < n else self.hw.intra_bps
        return (3 if self.zero_stage >= 3 else 1) * ring_bytes / bw

    def capacity(self, d: int) -> int:
        return self.tokens_per_rank * d

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.shape.params,
            "tokens_per_rank": self.tokens_per_rank,
            "achievable_tflops": self.hw.peak_flops / 1e12,
            "zero_stage": self.zero_stage,
            "dtype": self.dtype,
            **self.source,
        }
