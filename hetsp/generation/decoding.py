"""Decoders for sampling and Diverse Beam Search: rows of token ids advanced one token per step.

Both decoders answer the same three calls, so the searches above them do not know which runs:

    dec.start(rows)              # (n, V) logits after each row (a list of token lists)
    dec.advance(parents, tokens) # new row i = old row parents[i] followed by tokens[i]; (n', V) logits
    dec.idle()                   # one forward with nothing to decode (keeps ZeRO-3's gathers in step)

`CachedDecoder` runs the prompts once and then one token per row per step with the model's own
cache: `models.HybridCache` for hetsp's hybrid model (attention keys/values, S4D/EMA/Mamba-2
states, convolution tails, SeqBoat's EMA state and window), transformers' cache for stock models
(Llama, Qwen2, Mistral: keys/values; Bamba, GraniteMoeHybrid: keys/values, Mamba-2 states and
convolution tails). Rows of different lengths are left-padded, with the attention mask and each
row's own positions (0 at its first real token), which every supported family honours exactly.
`advance` reorders (and shrinks) the cache by `parents` (beams; finished samples dropped).
Attention runs with "sdpa" while decoding: hetsp's ring attention takes packed rows without a
cache, so the model's attention implementation is switched for the duration (`decoding_attention`).

`FullForwardDecoder` recomputes every row's whole prefix with one packed forward through hetsp's
layout (a group of one): the uncached reference, and the path for a model whose cache is not
known to be exact (`cached_decoding_supported`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

# Families whose cache is exact with left padding (tests/test_cached_decoding.py); anything else
# decodes with the full forward (logged once per model class).
_CACHED_MODEL_TYPES = ("hetsp_hybrid", "llama", "qwen2", "mistral", "bamba", "granitemoehybrid")
_DECODING_ATTENTION = ("eager", "sdpa")
_logged: set[str] = set()


def _config(model: Any) -> Any:
    return model.config


def cached_decoding_supported(model: Any) -> bool:
    """Whether `CachedDecoder` is exact for `model` (its config's model_type is on the allow-list)."""
    return getattr(_config(model), "model_type", None) in _CACHED_MODEL_TYPES


def make_decoder(model: Any, device: Any, kernel: str, rank: int = 0, local: bool = False, use_cache: bool = True) -> Any:
    """`CachedDecoder` when asked for and supported, else `FullForwardDecoder` (saying why, once)."""
    if use_cache and cached_decoding_supported(model):
        return CachedDecoder(model, device)
    if use_cache:
        kind = getattr(_config(model), "model_type", type(model).__name__)
        if kind not in _logged:
            _logged.add(kind)
            log.info("generation for model type %r: full forward per token (its cache is not on hetsp's list of exact ones)", kind)
    return FullForwardDecoder(model, device, kernel, rank, local)


@contextlib.contextmanager
def decoding_attention(model: Any) -> Iterator[None]:
    """The model's attention implementation set to "sdpa" while decoding (unless it is eager or sdpa
    already); restored afterwards, also on error."""
    cfg = _config(model)
    old = cfg._attn_implementation
    if old not in _DECODING_ATTENTION:
        cfg._attn_implementation = "sdpa"
    try:
        yield
    finally:
        if cfg._attn_implementation != old:
            cfg._attn_implementation = old


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


class CachedDecoder:
    """Incremental decoding with the model's cache. A context manager: inside `with`, the model's
    attention runs as "sdpa" (`decoding_attention`)."""

    def __init__(self, model: Any, device: Any):
        self.model = model
        self.device = device
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (n, past) 1 at real tokens, 0 at left pads
        self.next_pos: torch.Tensor | None = None  # (n,) position of each row's next token
        self._attention: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> "CachedDecoder":
        self._attention = decoding_attention(self.model)
        self._attention.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cache = None
        self._attention.__exit__(*exc)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        padded = bool((self.mask == 0).any())
        out = self.model(
            input_ids=ids, attention_mask=self.mask if padded else None, position_ids=positions,
            cache=self.cache, use_cache=True, logits_to_keep=1,
        )
        self.cache = out.cache
        if self.cache is None:
            raise ValueError(f"{type(self.model).__name__} returned no cache with use_cache=True; decode it with use_cache=False")
        return _logits(out)[:, -1]

    def start(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits after each row, (n, V). Equal rows run once (their cache entries are copied)."""
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("decoding needs at least one row and a token in every row")
        first: dict[tuple[int, ...], int] = {}
        index = [first.setdefault(tuple(int(t) for t in r), len(first)) for r in rows]
        unique = list(first)
        width = max(len(r) for r in unique)
        ids = torch.zeros(len(unique), width, dtype=torch.long)
        mask = torch.zeros(len(unique), width, dtype=torch.long)
        for i, r in enumerate(unique):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        self.cache, self.mask = None, mask.to(self.device)
        positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        self.next_pos = self.mask.sum(-1)
        logits = self._forward(ids.to(self.device), positions)
        if len(unique) < len(rows):
            logits = self._select(torch.tensor(index, device=self.device), logits)
        return logits

    def _select(self, index: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor | None:
        self.cache.reorder_cache(index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        return None if logits is None else logits[index]

    def advance(self, parents: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Row i becomes old row `parents[i]` followed by `tokens[i]`; its logits, (n', V)."""
        if len(parents) != len(tokens) or not parents:
            raise ValueError(f"advance needs one token per kept row, got {len(parents)} parents and {len(tokens)} tokens")
        if list(parents) != list(range(self.mask.shape[0])):
            self._select(torch.tensor(list(parents), device=self.device))
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]
        positions = self.next_pos[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        self.next_pos = self.next_pos + 1
        return self._forward(ids, positions)

    def idle(self, placeholder_token: int = 0) -> None:
        self.model(input_ids=torch.tensor([[placeholder_token]], device=self.device), use_cache=False)


class FullForwardDecoder:
    """Every row's whole prefix recomputed at every step, one packed forward (a group of one).
    Packed rows need documents kept apart: hetsp's ring attention, or the hybrid model (it reads
    the boundaries from `hetsp_shard`); other attention implementations are refused."""

    def __init__(self, model: Any, device: Any, kernel: str, rank: int = 0, local: bool = False):
        from hetsp.attention.hf import NAME

        cfg = _config(model)
        if cfg._attn_implementation != NAME and getattr(cfg, "model_type", None) != "hetsp_hybrid":
            raise ValueError(
                f"full-forward decoding packs rows into one sequence: {type(model).__name__} with attention "
                f"{cfg._attn_implementation!r} would let rows see each other; build it with hetsp's ring attention "
                f"(attn_implementation=hetsp.attention.register_attention()) or decode with the cache"
            )
        self.model, self.device, self.kernel, self.rank, self.local = model, device, kernel, rank, local
        self.rows: list[list[int]] = []

    def __enter__(self) -> "FullForwardDecoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.rows = []

    def _logits(self) -> torch.Tensor:
        from hetsp.generation.sampling import packed_last_logits

        return packed_last_logits(self.model, self.rows, self.rank, self.device, self.kernel, local=self.local)

    def start(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("decoding needs at least one row and a token in every row")
        self.rows = [list(r) for r in rows]
        return self._logits()

    def advance(self, parents: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        if len(parents) != len(tokens) or not parents:
            raise ValueError(f"advance needs one token per kept row, got {len(parents)} parents and {len(tokens)} tokens")
        self.rows = [self.rows[p] + [int(t)] for p, t in zip(parents, tokens)]
        return self._logits()

    def idle(self, placeholder_token: int = 0) -> None:
        from hetsp.generation.sampling import packed_last_logits

        packed_last_logits(self.model, [[placeholder_token]], self.rank, self.device, self.kernel, local=self.local)
