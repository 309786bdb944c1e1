"""Fine-tuning data in TRL's conventions: ``"prompt"``/``"completion"`` and ``"messages"``.

(``"text"``, continued pretraining, is the document pipeline of `hetsp.data.module`.)
Each example becomes one sequence with a per-token ``trainable`` mask
(`hetsp.data.corpus.MaskedSequence`): prompt tokens False, completion tokens
True, so the language-modelling objective puts targets only on the
completion (``IGNORE_INDEX`` elsewhere) and a step's unit count is the number
of completion targets in the global batch, whatever the plan.

* prompt/completion: ``[bos] prompt completion eos`` (bos when ``data.add_bos``);
  the completion and the eos are trainable.
* messages: the conversation rendered with the tokenizer's chat template, tokenized
  exactly as ``apply_chat_template(messages, tokenize=True)`` does; every token that
  starts inside an assistant turn's rendering is trainable.

An example longer than ``data.max_seq_len`` follows ``data.prompt_policy``: "error"
(default), "drop" (counted), or "keep_end" (the first tokens are cut when none of them
is trainable, so the end of the prompt stays; otherwise the example is dropped, counted).
The embedded task ``data.dataset = "funcbody"`` (`hetsp.data.tasks.funcbody`) keeps the
main job's held-out files; other datasets hold out a seeded random fraction of examples.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from ..config import DataConfig
from .corpus import Sequences, split_documents
from .sources import load_source
from .tokenizer import load_tokenizer

log = logging.getLogger("hetsp.data")

FIELDS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",)}


def check_fields(column_names: Sequence[str], data: DataConfig) -> None:
    need = FIELDS[data.format]
    missing = [f for f in need if f not in column_names]
    if missing:
        raise ValueError(
            f"data.dataset = {data.dataset!r} has no field(s) {missing} that data.format = {data.format!r} needs; "
            f"its fields: {list(column_names)}. Rename them or set data.format to match the data"
        )


def encode_prompt_completion(tokenizer: Any, prompt: Any, completion: Any, add_bos: bool, where: str) -> tuple[list[int], list[bool]]:
    """(ids, trainable) of one prompt/completion example."""
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError(
            f"{where}: prompt and completion must be strings (got {type(prompt).__name__} and "
            f"{type(completion).__name__}); put conversations in a 'messages' field with data.format = 'messages'"
        )
    head = ([tokenizer.bos_token_id] if add_bos else []) + tokenizer.encode(prompt)
    tail = tokenizer.encode(completion) + [tokenizer.eos_token_id]
    return head + tail, [False] * len(head) + [True] * len(tail)


def _chat_template_tokenizer(tokenizer: Any) -> Any:
    hf = getattr(tokenizer, "hf", None)
    if hf is None or not getattr(hf, "chat_template", None):
        raise ValueError(
            f"data.format = 'messages' needs a tokenizer with a chat template; {tokenizer!r} has none "
            "(use the model's tokenizer, data.tokenizer = \"model\", or one whose tokenizer_config.json has chat_template)"
        )
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"data.format = 'messages' needs a fast tokenizer (tokenizer.json) to locate assistant tokens; {tokenizer!r} is slow")
    return hf


def render_messages(tokenizer: Any, messages: Any, where: str) -> tuple[list[int], list[bool]]:
    """(ids, trainable) of one conversation: the chat template's rendering, assistant turns trainable."""
    hf = _chat_template_tokenizer(tokenizer)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} dicts")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing to train on; roles: {[m['role'] for m in messages]}")
    text = hf.apply_chat_template(messages, tokenize=False)
    spans = []
    for i in turns:
        before = hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = hf.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"{where}: the chat template does not render the conversation as a sequence of prefixes, "
                "so the assistant tokens cannot be located; use prompt/completion data instead"
            )
        spans.append((len(before), len(through)))
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    trainable = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return ids, trainable


def fit_length(ids: list[int], trainable: list[bool], max_len: int, policy: str, where: str) -> tuple[list[int], list[bool]] | None:
    """The example within `max_len` under `policy`, or None when it is dropped."""
    if len(ids) <= max_len:
        return ids, trainable
    if policy == "error":
        raise ValueError(
            f"{where}: {len(ids)} tokens, longer than data.max_seq_len = {max_len}; set data.prompt_policy to "
            "'drop' (skip such examples, counted) or 'keep_end' (cut the start of the prompt), or raise max_seq_len"
        )
    cut = len(ids) - max_len
    if policy == "keep_end" and not any(trainable[:cut + 1]):  # the first kept token is no target either
        return ids[cut:], trainable[cut:]
    return None


def encode_examples(rows: Sequence[dict[str, Any]], tokenizer: Any, data: DataConfig, counts: dict[str, int],
                    first_index: int = 0) -> tuple[list[list[int]], list[list[bool]]]:
    ids_out, mask_out = [], []
    for k, row in enumerate(rows):
        where = f"data.dataset = {data.dataset!r}, example {first_index + k}"
        if data.format == "messages":
            ids, mask = render_messages(tokenizer, row["messages"], where)
        else:
            ids, mask = encode_prompt_completion(tokenizer, row["prompt"], row["completion"], data.add_bos, where)
        fitted = fit_length(ids, mask, data.max_seq_len, data.prompt_policy, where)
        if fitted is None:
            counts["long_dropped"] += 1
            continue
        if len(fitted[0]) != len(ids):
            counts["prompts_cut"] += 1
        if len(fitted[0]) < 2 or not any(fitted[1][1:]):
            counts["no_target_dropped"] += 1
            continue
        ids_out.append(fitted[0])
        mask_out.append(fitted[1])
    return ids_out, mask_out


def to_sequences(ids: list[list[int]], masks: list[list[bool]], vocab_size: int) -> Sequences:
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    starts = np.zeros(len(ids), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(lengths.sum()))
    trainable = np.fromiter((m for x in masks for m in x), dtype=bool, count=int(lengths.sum()))
    return Sequences(flat, starts, lengths, np.arange(len(ids), dtype=np.int64), trainable)


def load_examples(data: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, validation rows) of the configured fine-tuning dataset."""
    from .tasks import funcbody

    if data.dataset == funcbody.DATASET_NAME:
        if data.format != "prompt_completion":
            raise ValueError(f"data.dataset = 'funcbody' gives prompt/completion examples; set data.format = 'prompt_completion' (got {data.format!r})")
        return funcbody.load_funcbody(data)
    ds = load_source(data)
    check_fields(ds.column_names, data)
    if len(ds) == 0:
        raise ValueError(f"data.dataset = {data.dataset!r} has no examples")
    rows = ds.to_list()
    train_pos, val_pos = split_documents(len(rows), data.validation_fraction, data.validation_seed)
    return [rows[i] for i in train_pos], [rows[i] for i in val_pos]


def build_finetune_data(data: DataConfig, seed: int) -> Any:
    """A `DataModule` of masked fine-tuning sequences (ValueError on unusable input, before training)."""
    from .module import DataModule

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(data.tokenizer)
    if data.add_bos and tokenizer.bos_token_id < 0:
        raise ValueError(f"data.add_bos = true but tokenizer {data.tokenizer!r} has no bos token; set add_bos = false")
    train_rows, val_rows = load_examples(data)
    counts = dict(long_dropped=0, prompts_cut=0, no_target_dropped=0)
    train_ids, train_masks = encode_examples(train_rows, tokenizer, data, counts)
    val_ids, val_masks = encode_examples(val_rows, tokenizer, data, counts, first_index=len(train_rows))
    if not train_ids:
        raise ValueError(
            f"data.dataset = {data.dataset!r}: no training example left ({len(train_rows)} read; {counts}); "
            "raise data.max_seq_len or change data.prompt_policy"
        )
    train = to_sequences(train_ids, train_masks, tokenizer.vocab_size)
    val = to_sequences(val_ids, val_masks, tokenizer.vocab_size) if val_ids else Sequences(
        np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
    stats = dict(examples=len(train_rows) + len(val_rows), **counts, train_sequences=len(train), val_sequences=len(val),
                 train_tokens=train.num_tokens, val_tokens=val.num_tokens,
                 train_targets=int(sum(train_masks[i][1:].count(True) for i in range(len(train_masks)))),
                 build_seconds=round(time.perf_counter() - t0, 3))
    log.info("fine-tuning data %s (%s): %d examples; prompt_policy=%s: %d dropped as longer than max_seq_len=%d, "
             "%d prompts cut, %d without a target dropped; train %d sequences (%d tokens, %d targets), val %d sequences",
             data.dataset, data.format, stats["examples"], data.prompt_policy, counts["long_dropped"], data.max_seq_len,
             counts["prompts_cut"], counts["no_target_dropped"], len(train), train.num_tokens, stats["train_targets"], len(val))
    return DataModule(data, seed, tokenizer, train, val, stats)
