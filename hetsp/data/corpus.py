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


class MaskedSequence(list):
    """Token ids with a per-token ``trainable`` mask: the objective puts a target only on trainable
    tokens (the prompt of a fine-tuning example carries no loss). Indexes like the list it is."""

    def __init__(self, ids, trainable) -> None:
        super().__init__(ids)
        if len(trainable) != len(self):
            raise ValueError(f"trainable mask of {len(trainable)} entries for {len(self)} tokens")
        self.trainable = list(trainable)


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
    # (total,) bool or None: which tokens carry loss as targets (fine-tuning: completion tokens).
    trainable: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> list[int]:
        s = int(self.starts[i])
        ids = self.tokens[s : s + int(self.lengths[i])].tolist()
        if self.trainable is None:
            return ids
        return MaskedSequence(ids, self.trainable[s : s + int(self.lengths[i])].tolist())

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
    Vectorised: the python work is one slice per document, none per piece.
    """
    max_len = data.max_seq_len
    num_bos = 1 if data.add_bos else 0
    body_lens = offsets[doc_ids + 1] - offsets[doc_ids]
    seq_lens = body_lens + num_bos + 1
    is_long = seq_lens > max_len
    counts["long_documents"] += int(is_long.sum())
    if data.long_policy == "drop":
        counts["long_dropped"] += int(is_long.sum())
        counts["long_dropped_tokens"] += int(seq_lens[is_long].sum())
        doc_ids, seq_lens, is_long = doc_ids[~is_long], seq_lens[~is_long], is_long[~is_long]
    else:
        counts["long_split"] += int(is_long.sum())

    # One flat array of whole documents: [bos] body eos, back to back.
    doc_starts = np.zeros(len(doc_ids), dtype=np.int64)
    np.cumsum(seq_lens[:-1], out=doc_starts[1:])
    flat = np.empty(int(seq_lens.sum()), dtype=tokens.dtype)
    is_body = np.ones(len(flat), dtype=bool)
    if num_bos:
        flat[doc_starts] = tokenizer.bos_token_id
        is_body[doc_starts] = False
    flat[doc_starts + seq_lens - 1] = tokenizer.eos_token_id
    is_body[doc_starts + seq_lens - 1] = False
    if len(doc_ids):
        flat[is_body] = np.concatenate([tokens[offsets[d] : offsets[d + 1]] for d in doc_ids.tolist()])

    # Pieces: document i yields ceil(len / max_len) windows of max_len (the last shorter).
    num_pieces = -(-seq_lens // max_len)
    piece_doc = np.repeat(np.arange(len(doc_ids)), num_pieces)
    first_piece = np.zeros(len(doc_ids), dtype=np.int64)
    np.cumsum(num_pieces[:-1], out=first_piece[1:])
    offset_in_doc = (np.arange(len(piece_doc)) - first_piece[piece_doc]) * max_len
    starts = doc_starts[piece_doc] + offset_in_doc
    lengths = np.minimum(max_len, seq_lens[piece_doc] - offset_in_doc)
    keep = lengths >= 2
    counts["tail_tokens_dropped"] += int(lengths[~keep].sum())
    counts["split_pieces"] += int((keep & is_long[piece_doc]).sum())
    return Sequences(flat, starts[keep], lengths[keep], doc_ids[piece_doc[keep]].astype(np.int64))
