"""The interface every local block kernel implements.

Legend: T tokens (packed segments), H query heads, K key/value heads, D head dim.

A block kernel computes attention of packed query segments against packed key
segments (segment i of q attends only segment i of k) and returns the
block-normalised output with its log-sum-exp, so that a ring can merge blocks.
Callers guarantee that no segment is empty (a zero-length q or k crashes some
kernels) and that causal blocks have equal query and key lengths per segment,
so the causal alignment (stated per kernel) never changes the result inside
hetsp; it matters only to direct callers.

forward(q_THD, k_TKD, v_TKD, seg, causal, scale, *, window=None, softcap=None) -> (out_THD in q's dtype, lse_TH)
backward(dout_THD, q_THD, k_TKD, v_TKD, out_THD, lse_TH, seg, causal, scale, *, window=None, softcap=None) -> (dq, dk, dv)
    The backward must use the `out` and `lse` it is given (the final merged ones
    of the ring), never recompute a block-local softmax. dk and dv have K heads.
Kernels with `lifetime_mask` also take the keyword `visible` (a `Lifetimes`, or None for
today's path): inside a segment, key j is visible to query i iff
k_time[j] <= q_time[i] < k_pop[j] (stack-structured sequences, hetsp/backspace.py); a
row with no visible key gets lse = -inf.
lse is float64 for float64 inputs and float32 otherwise ("accumulation dtype").

Optional score modifiers (the keywords are passed only when set; defaults reproduce plain
attention), with the meaning transformers gives them (Mistral, Qwen2, Gemma2):
    softcap c:  the score s = scale q.k becomes c tanh(s / c) before masking and softmax.
    window w:   query i sees key j of its segment iff 0 <= q_pos[i] - k_pos[j] < w (w keys,
                itself included), from the global positions `seg.q_pos` / `seg.k_pos`, which
                the caller must set; this mask replaces the index-aligned causal mask.
A kernel that cannot express a modifier raises `NotImplementedError` naming it and the
kernel to use instead; it never ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of merged outputs, log-sum-exps and gradient accumulators for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Segments:
    """Matching query and key segments of one block (none empty).

    cu_q, cu_k: cumulative lengths as Python ints (len = num segments + 1).
    max_q, max_k: longest segment. Device copies (int32) are made on first use; kernels may
    keep other derived data in `cache`.
    """

    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    q_pos: tuple[int, ...] | None = None  # global position of each query row (sliding windows only)
    k_pos: tuple[int, ...] | None = None  # global position of each key row

    @property
    def num_segments(self) -> int:
        return len(self.cu_q) - 1

    @property
    def max_q(self) -> int:
        return max((b - a for a, b in zip(self.cu_q, self.cu_q[1:])), default=0)

    @property
    def max_k(self) -> int:
        return max((b - a for a, b in zip(self.cu_k, self.cu_k[1:])), default=0)

    def device_cu(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cu_q, cu_k) as int32 tensors on `device`."""
        key = ("cu", str(device))
        if key not in self.cache:
            self.cache[key] = (
                torch.tensor(self.cu_q, dtype=torch.int32, device=device),
                torch.tensor(self.cu_k, dtype=torch.int32, device=device),
            )
        return self.cache[key]

    def device_pos(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_pos, k_pos) as int64 tensors on `device`; raises when the block carries no positions."""
        if self.q_pos is None or self.k_pos is None:
            raise ValueError("a sliding-window block needs the rows' global positions: set Segments.q_pos and k_pos")
        key = ("pos", str(device))
        if key not in self.cache:
            self.cache[key] = (
                torch.tensor(self.q_pos, dtype=torch.long, device=device),
                torch.tensor(self.k_pos, dtype=torch.long, device=device),
            )
        return self.cache[key]


def window_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """(nq, nk) bool: key j is visible to query i, 0 <= q_pos[i] - k_pos[j] < window."""
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) & (diff < window)


def softcap_scores(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """c tanh(s / c) (transformers' attention logit softcapping), or `s` when no cap."""
    return s if softcap is None else torch.tanh(s / softcap) * softcap


@dataclass
class Lifetimes:
    """Per-row times of one block for the lifetime mask (int64 tensors on the block's device).

    q_time (Tq,): each query's index in its own sequence; k_time, k_pop (Tk,): each key's
    index in its sequence and the first index at which it is no longer visible.
    """

    q_time: torch.Tensor
    k_time: torch.Tensor
    k_pop: torch.Tensor

    def allowed(self, a: int, b: int, c: int, e: int) -> torch.Tensor:
        """(b - a, e - c) bool mask of query rows [a, b) against key rows [c, e)."""
        qt = self.q_time[a:b, None]
        return (self.k_time[None, c:e] <= qt) & (qt < self.k_pop[None, c:e])


@dataclass(frozen=True)
class BlockKernel:
    """A named pair of block functions and the causal alignment they use."""

    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    causal_alignment: str  # "top_left" or "bottom_right" (when q and k lengths differ)
    note: str = ""
    lifetime_mask: bool = False  # takes `visible=Lifetimes` (stack-structured sequences)
    score_modifiers: frozenset = frozenset()  # of "window", "softcap": the modifiers it implements

    def __repr__(self) -> str:
        return f"BlockKernel({self.name!r}, causal_alignment={self.causal_alignment!r})"


def repeat_kv(x_TKD: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(T, K, D) -> (T, H, D), query head h using kv head h // (H / K)."""
    groups = num_heads // x_TKD.shape[1]
    return x_TKD if groups == 1 else x_TKD.repeat_interleave(groups, dim=1)


def reduce_kv(dx_THD: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Inverse of `repeat_kv` for gradients: (T, H, D) -> (T, K, D), summing each group."""
    t, h, d = dx_THD.shape
    return dx_THD if h == num_kv_heads else dx_THD.view(t, num_kv_heads, h // num_kv_heads, d).sum(2)

