"""`HybridCache`: per-layer decoding state for `HybridForCausalLM`.

Attention layers keep keys and values (B, H_kv, T, head_dim); SSM layers keep
their recurrent state and convolution tail; SeqBoat layers keep their EMA state
and the last W activated keys/values. Each mixer reads and writes its own entry
(`layer(i)`), a plain dict, so the cache needs no knowledge of mixer kinds.
"""

from __future__ import annotations

from typing import Any

import torch


class HybridCache:
    def __init__(self, num_layers: int):
        self.layers: list[dict[str, Any]] = [{} for _ in range(num_layers)]
        self.seen_tokens = 0

    def layer(self, idx: int) -> dict[str, Any]:
        return self.layers[idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def update_kv(self, idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, L, D) keys/values; return all keys/values seen so far."""
        entry = self.layers[idx]
        if "key" in entry:
            key = torch.cat([entry["key"], key], 2)
            value = torch.cat([entry["value"], value], 2)
        entry["key"], entry["value"] = key, value
        return key, value

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for entry in self.layers:
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    entry[name] = value.index_select(0, beam_idx.to(value.device))

    def __len__(self) -> int:
        return len(self.layers)
