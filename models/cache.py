"""`HybridCache`: per-layer decoding state for `HybridForCausalLM`.

Attention layers keep keys and values (B, H_kv, T, head_dim); SSM layers keep
their recurrent state and convolution tail; SeqBoat layers keep their EMA state
and the last W activated keys/values. Each mixer reads and writes its own entry
(`layer(i)`), a plain dict, so the cache needs no knowledge of mixer kinds.
"""

from __future__ import annotations

from typing import Any

import torch


# Entries holding segment ids (>= 0; -1 at empty slots), which in unpacked rows are row indices.
_ROW_SEGMENT_ENTRIES = ("prefix_seg",)


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
        """Row i becomes old row beam_idx[i] (rows may be dropped or repeated)."""
        for entry in self.layers:
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    value = value.index_select(0, beam_idx.to(value.device))
                    if name in _ROW_SEGMENT_ENTRIES:
                        # Unpacked rows are their own segments (segment id = row index): renumber.
                        rows = torch.arange(value.shape[0], device=value.device).view(-1, *([1] * (value.ndim - 1)))
                        value = torch.where(value >= 0, rows.to(value.dtype), value)
                    entry[name] = value

    def __len__(self) -> int:
        return len(self.layers)
