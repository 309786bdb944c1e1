"""`build_data`: from a `DataConfig` and a seed to a `DataModule` serving global batches."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..config import DataConfig
from .batching import EpochSchedule, cut_by_budget
from .corpus import Sequences, make_sequences, split_documents, tokenize_dataset
from .sources import load_documents
from .tokenizer import load_tokenizer

log = logging.getLogger("hetsp.data")


class DataModule:
    """Tokenized train/validation sequences and the per-step global batches.

    A global batch is a list of token-id lists, each of 2..max_seq_len tokens, summing to at
    most ``tokens_per_batch``; it depends only on (seed, step), so every rank builds the same
    one locally and a resumed run starts at any step directly.
    """

    def __init__(
        self, data: DataConfig, seed: int, tokenizer: Any, train: Sequences, val: Sequences, stats: dict
    ) -> None:
        self.config = data
        self.seed = seed
        self.tokenizer = tokenizer
        self.vocab_size: int = tokenizer.vocab_size
        self.train = train
        self.val = val
        self.stats = stats
        self._schedule = EpochSchedule(train.lengths, data.tokens_per_batch, seed)
        val_bounds = cut_by_budget(val.lengths, data.tokens_per_batch) if len(val) else np.zeros(1, np.int64)
        self._val_bounds = val_bounds

    def train_batch(self, step: int) -> list[list[int]]:
        """The global batch of `step`: token-id lists (lengths in ``train_batch_lengths(step)``)."""
        return [self.train.get(i) for i in self._schedule.indices(step).tolist()]

    def train_batch_lengths(self, step: int) -> list[int]:
        """Sequence lengths of the global batch of `step`, without building the token lists."""
        return self.train.lengths[self._schedule.indices(step)].tolist()

    def epoch_of(self, step: int) -> int:
        return self._schedule.epoch_of(step)

    @property
    def num_val_batches(self) -> int:
        return len(self._val_bounds) - 1

    def val_batches(self, num: int) -> list[list[list[int]]]:
        """The first `num` held-out batches (fixed order, same budget); fewer if the split is smaller."""
        n = min(num, self.num_val_batches)
        b = self._val_bounds
        return [[self.val.get(i) for i in range(int(b[k]), int(b[k + 1]))] for k in range(n)]


def check_data_config(data: DataConfig) -> None:
    """ValueError for settings no corpus can satisfy (checked before any loading)."""
    if data.max_seq_len < 2:
        raise ValueError(f"data.max_seq_len = {data.max_seq_len}: a sequence needs at least 2 tokens")
    if data.tokens_per_batch < data.max_seq_len:
        raise ValueError(
            f"data.tokens_per_batch = {data.tokens_per_batch} is smaller than one sequence "
            f"(data.max_seq_len = {data.max_seq_len}); the smallest budget that works is "
            f"tokens_per_batch = {data.max_seq_len}, or lower max_seq_len"
        )
    if data.long_policy not in ("split", "drop"):
        raise ValueError(f"data.long_policy = {data.long_policy!r}: must be 'split' or 'drop'")
    if not 0.0 <= data.validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction = {data.validation_fraction}: must be in [0, 1)")
    if data.num_proc < 1:
        raise ValueError(f"data.num_proc = {data.num_proc}: must be >= 1")
    if data.format == "text" and data.dataset == "funcbody":
        raise ValueError("data.dataset = 'funcbody' gives prompt/completion examples; set data.format = 'prompt_completion'")
    if data.max_documents < 0:
        raise ValueError(f"data.max_documents = {data.max_documents}: must be >= 0 (0 keeps all)")


def build_data(data: DataConfig, seed: int) -> DataModule:
    """Load, tokenize and split the configured corpus; raise ValueError on unusable input."""
    t0 = time.perf_counter()
    check_data_config(data)
    if data.format != "text":
        from .finetune import build_finetune_data

        return build_finetune_data(data, seed)
    tokenizer = load_tokenizer(data.tokenizer)
    if data.add_bos and tokenizer.bos_token_id < 0:
        raise ValueError(f"data.add_bos = true but tokenizer {data.tokenizer!r} has no bos token; set add_bos = false")
    ds = load_documents(data)
    tokens, offsets, tok_seconds = tokenize_dataset(ds, tokenizer, data)

    num_documents = len(offsets) - 1
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    if len(nonempty) == 0:
        raise ValueError(
            f"data.dataset = {data.dataset!r}: all {num_documents} documents in field "
            f"{data.text_field!r} are empty; nothing to train on"
        )
    train_pos, val_pos = split_documents(len(nonempty), data.validation_fraction, data.validation_seed)
    counts = dict(long_documents=0, long_split=0, split_pieces=0, long_dropped=0,
                  long_dropped_tokens=0, tail_tokens_dropped=0)
    train = make_sequences(tokens, offsets, nonempty[train_pos], tokenizer, data, counts)
    val = make_sequences(tokens, offsets, nonempty[val_pos], tokenizer, data, counts)
    if len(train) == 0:
        raise ValueError(
            f"no training sequences left: all {len(train_pos)} training documents are longer than "
            f"data.max_seq_len = {data.max_seq_len} and data.long_policy = 'drop'; "
            "raise max_seq_len or use long_policy = 'split'"
        )
    stats = dict(
        documents=num_documents,
        empty_skipped=num_documents - len(nonempty),
        **counts,
        train_documents=len(train_pos),
        val_documents=len(val_pos),
        train_sequences=len(train),
        val_sequences=len(val),
        train_tokens=train.num_tokens,
        val_tokens=val.num_tokens,
        tokens=train.num_tokens + val.num_tokens,
        tokenize_seconds=round(tok_seconds, 3),
    )
    if data.validation_fraction > 0 and len(val) == 0:
        log.warning(
            "data: validation_fraction = %s but no held-out sequences (%d documents held out): "
            "validation loss is unavailable", data.validation_fraction, len(val_pos),
        )
    module = DataModule(data, seed, tokenizer, train, val, stats)
    stats["build_seconds"] = round(time.perf_counter() - t0, 3)
    log.info(
        "data %s: %d documents (%d empty skipped), %d tokens; long_policy=%s: %d longer than "
        "max_seq_len=%d, %d split into %d pieces, %d dropped (%d tokens); train %d docs / %d seqs, "
        "val %d docs / %d seqs; tokenized in %.1fs, built in %.1fs",
        data.dataset, num_documents, stats["empty_skipped"], stats["tokens"], data.long_policy,
        counts["long_documents"], data.max_seq_len, counts["long_split"], counts["split_pieces"],
        counts["long_dropped"], counts["long_dropped_tokens"], len(train_pos), len(train),
        len(val_pos), len(val), tok_seconds, stats["build_seconds"],
    )
    return module
