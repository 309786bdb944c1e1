"""FlexSP's published cost model (Wang et al., ASPLOS 2025), as its released solver computes it.

Ulysses all-to-all inside groups. For a group of d ranks holding sequences S:
time (ms) = sum_s (a1 s^2 + a2 s) / d + b1 + A2A, with
A2A = (4 * 2 * layers * hidden * sum(S) * 2 bytes / 2^20 / d) / bw(d) (MB over GB/s
gives ms; 0 for d = 1). b1 is paid by every group, and groups of one
micro-batch run in parallel, so b1 is the micro-batch's fixed cost here.
Token capacity per rank = floor((mem_GB * 1024 - params_B * 16 * 1024 / N) / act_MB_per_token)
(ZeRO-3 model states over N ranks). Constants: A100-40GB profiles published by FlexSP.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from .base import CostModel

# All-to-all bandwidth (GB/s) by group degree, measured by FlexSP on 8 nodes of 8 A100s.
FLEXSP_BANDWIDTH_GBPS = {2: 119.54, 4: 104.07, 8: 96.5, 16: 10.33, 32: 5.94, 64: 4.87}


@dataclass(frozen=True)
class FlexSPModelConstants:
    """Profiled constants of one GPT model: ms per token^2, ms per token, ms, MB per token."""

    a1: float
    a2: float
    b1: float
    act_mb_per_token: float
    hidden: int
    layers: int
    params_b: float  # billions of parameters at the 192K context


FLEXSP_MODELS = {
    "7b": FlexSPModelConstants(5.128e-6, 0.1839576, 629.36, 4.480441895, 4096, 32, 7.117),
    "13b": FlexSPModelConstants(9.2852e-6, 0.3060189, 1132.56, 4.220439453, 5120, 40, 13.116),
    "30b": FlexSPModelConstants(15.4262e-6, 0.8035742, 2789.36, 3.417381836, 6656, 60, 31.525),
}


@functools.lru_cache(maxsize=4096)
def flexsp_bandwidth(d: int) -> float:
    """All-to-all bandwidth (GB/s) of a degree-d group: the table, log-interpolated between entries.

    Degrees outside FlexSP's table use the nearest entry (an assumption: FlexSP
    measured only 2..64). Degree 1 needs no all-to-all.
    """
    table = FLEXSP_BANDWIDTH_GBPS
    if d in table:
        return table[d]
    keys = sorted(table)
    if d <= keys[0]:
        return table[keys[0]]
    if d >= keys[-1]:
        return table[keys[-1]]
    lo = max(k for k in keys if k < d)
    hi = min(k for k in keys if k > d)
    t = (math.log(d) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return math.exp((1 - t) * math.log(table[lo]) + t * math.log(table[hi]))


class FlexSPCostModel(CostModel):
    """FlexSP's model for `model` ("7b", "13b", "30b") on `num_ranks` ranks with `memory_gb` per rank."""

    name = "flexsp"
    additive = True

    def __init__(self, model: str, num_ranks: int, memory_gb: float = 30.0) -> None:
        key = model.lower()
        if key not in FLEXSP_MODELS:
            raise ValueError(f"flexsp cost model: unknown model {model!r}; choose one of {sorted(FLEXSP_MODELS)}")
        if memory_gb <= 0:
            raise ValueError(f"flexsp cost model needs memory per rank > 0 GB, got {memory_gb}")
        self.model = key
        self.c = FLEXSP_MODELS[key]
        self.num_ranks = num_ranks
        self.memory_gb = memory_gb
        states_mb = self.c.params_b * 16 * 1024 / num_ranks
        self.tokens_per_rank = math.floor((memory_gb * 1024 - states_mb) / self.c.act_mb_per_token)
        if self.tokens_per_rank < 1:
            raise ValueError(
                f"flexsp {key}: model states ({states_mb:.0f} MB per rank on {num_ranks} ranks) leave no room "
                f"for activations in {memory_gb} GB; add ranks or memory"
            )
        # MB moved per token by the 8 all-to-alls of every layer, before dividing by d.
        self._a2a_mb_per_token = 4 * 2 * self.c.layers * self.c.hidden * 2 / 2**20

    @property
    def fixed_s(self) -> float:
        return self.c.b1 / 1e3

    def seq_comm(self, s: int, d: int) -> float:
        if d == 1:
            return 0.0
        return self._a2a_mb_per_token * s / d / flexsp_bandwidth(d) / 1e3

    def seq_time(self, s: int, d: int) -> float:
        return (self.c.a1 * s * s + self.c.a2 * s) / d / 1e3 + self.seq_comm(s, d)

    def capacity(self, d: int) -> int:
        return self.tokens_per_rank * d

    def memory_per_rank_gb(self, lengths, d: int) -> float:
        states_mb = self.c.params_b * 16 * 1024 / self.num_ranks
        return (sum(lengths) / d * self.c.act_mb_per_token + states_mb) / 1024

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "source": "FlexSP (ASPLOS 2025) profiled constants, A100-40GB",
            "tokens_per_rank": self.tokens_per_rank,
            "memory_gb": self.memory_gb,
        }
