"""Tokenize a document dataset and turn documents into training sequences.

A corpus is held as one flat token array plus per-sequence (start, length), so a
global batch is a handful of slices. Token ids are stored as uint16 when the
vocabulary fits, else int32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import DataConfig


@dataclass(frozen=True)
class Sequences:
    """Training sequences: sequence i is ``tokens[starts[i] : starts[i] + lengths[i]]``.

    tokens: (total,) uint16/int32; starts, lengths, documents: (num_sequences,) int64, where
    documents[i] is the source row (document index) that sequence i comes from.
    """

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    documents: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> list[int]:
        s = int(self.starts[i])
        return self.tokens[s : s + int(self.lengths[i])].tolist()

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def _encode_batch(batch: dict[str, list], tokenizer: Any, text_field: str) -> dict[str, list]:
    texts = [t if t is not None else "" for t in batch[text_field]]
    return {"input_ids": tokenizer.encode_batch(texts)}


def tokenize_dataset(ds: Any, tokenizer: Any, data: DataConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Tokenize every document (no special tokens) with a batched, in-memory `datasets.map`.

    Returns (tokens (total,), offsets (num_documents + 1,) int64, seconds): document i is
    ``tokens[offsets[i]:offsets[i+1]]``.
    """
    t0 = time.perf_counter()
    out = ds.map(
        _encode_batch,
        batched=True,
        batch_size=256,
        keep_in_memory=True,
        remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "text_field": data.text_field},
        num_proc=data.num_proc if data.num_proc > 1 else None,
        desc="tokenizing",
    )
    column = out.data.column("input_ids").combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False)
    offsets -= offsets[0]
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    return values.astype(dtype, copy=False), offsets, time.perf_counter() - t0


def split_documents(num_documents: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) document indices; val is a seeded random ``fraction`` (at least one when > 0).

    Train indices are ascending; val indices keep the shuffled order. At least one
    document always stays in train.
    """
    num_val = int(round(fraction * num_documents))
    if fraction > 0 and num_val == 0 and num_documents >= 2:
        num_val = 1
    num_val = min(num_val, num_documents - 1)
    order = np.random.default_rng([seed, 0x5A11]).permutation(num_documents)
    return np.sort(order[num_val:]), order[:num_val]


def make_sequences(
    tokens: np.ndarray, offsets: np.ndarray, doc_ids: np.ndarray, tokenizer: Any, data: DataConfig, counts: dict
) -> Sequences:
    """Documents ``doc_ids`` as sequences ``[bos] + body + [eos]`` under the long-document policy.

    "split": a sequence longer than max_seq_len is cut into pieces of max_seq_len (the last
    may be shorter; a one-token last piece has no target and is dropped, counted in
    ``tail_tokens_dropped``). "drop": it is removed. `counts` is updated in place.
    """
    max_len = data.max_seq_len
    bos = [tokenizer.bos_token_id] if data.add_bos else []
    eos = [tokenizer.eos_token_id]
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    sources: list[int] = []
    for d in doc_ids.tolist():
        body = tokens[offsets[d] : offsets[d + 1]]
        seq = np.concatenate([np.asarray(bos, tokens.dtype), body, np.asarray(eos, tokens.dtype)])
        n = len(seq)
        if n > max_len:
            counts["long_documents"] += 1
            if data.long_policy == "drop":
                counts["long_dropped"] += 1
                counts["long_dropped_tokens"] += n
                continue
            counts["long_split"] += 1
            for s in range(0, n, max_len):
                piece = seq[s : s + max_len]
                if len(piece) < 2:
                    counts["tail_tokens_dropped"] += len(piece)
                    continue
                counts["split_pieces"] += 1
                pieces.append(piece)
                lengths.append(len(piece))
                sources.append(d)
        else:
            pieces.append(seq)
            lengths.append(n)
            sources.append(d)
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    starts = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths_arr[:-1], out=starts[1:])
    flat = np.concatenate(pieces) if pieces else np.zeros(0, tokens.dtype)
    return Sequences(flat, starts, lengths_arr, np.asarray(sources, dtype=np.int64))
