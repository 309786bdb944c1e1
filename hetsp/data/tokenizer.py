"""Tokenizers with one small interface: the built-in byte-level one and local transformers folders.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``encode_batch(texts)``
(a list of 1-D integer numpy arrays, the fast path used to tokenize a corpus),
``bos_token_id``, ``eos_token_id``, ``pad_token_id`` and ``vocab_size``.

A `<bkspc>` action (SequenceMatch, REFERENCE.md section 4) is one extra id appended after
every existing id: ``add_bkspc(tokenizer)`` sets ``bkspc_token_id`` (None when absent).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

log = logging.getLogger("hetsp.data")


class Tokenizer(Protocol):
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then bos=256, eos=257, pad=258 (vocab_size 259); with
    `bkspc`, `<bkspc>` = 259 (vocab_size 260)."""

    name = "bytes"
    BKSPC = "<bkspc>"

    def __init__(self, bkspc: bool = False) -> None:
        self.bos_token_id = 256
        self.eos_token_id = 257
        self.pad_token_id = 258
        self.vocab_size = 259
        self.bkspc_token_id: int | None = None
        if bkspc:
            self.bkspc_token_id = 259
            self.vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A transformers tokenizer loaded from a local folder, behind the same interface.

    Special tokens are never added by ``encode``; the data pipeline adds bos/eos itself.
    `hf` is the underlying transformers tokenizer (for saving next to an exported model).
    """

    def __init__(self, hf: Any, path: str) -> None:
        self.hf = hf
        self.name = path
        if hf.eos_token_id is None:
            raise ValueError(
                f"tokenizer {path!r} has no eos token; documents must end with one. "
                "Set eos_token in its tokenizer_config.json or use tokenizer = \"bytes\"."
            )
        self.eos_token_id = int(hf.eos_token_id)
        self.bos_token_id = int(hf.bos_token_id) if hf.bos_token_id is not None else -1
        if hf.pad_token_id is not None:
            self.pad_token_id = int(hf.pad_token_id)
        else:
            self.pad_token_id = self.eos_token_id
            log.info("tokenizer %s has no pad token: padding with eos (id %d)", path, self.eos_token_id)
        self.vocab_size = len(hf)
        ids = hf.convert_tokens_to_ids(BKSPC_TOKEN) if BKSPC_TOKEN in hf.get_vocab() else None
        self.bkspc_token_id: int | None = None if ids is None else int(ids)

    def add_bkspc(self) -> None:
        """Append `<bkspc>` as a special token with the next free id (kept when saved with `hf`)."""
        if self.bkspc_token_id is not None:
            return
        self.hf.add_tokens([BKSPC_TOKEN], special_tokens=True)
        self.bkspc_token_id = int(self.hf.convert_tokens_to_ids(BKSPC_TOKEN))
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self.hf(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int64) for ids in out]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


BKSPC_TOKEN = "<bkspc>"


def add_bkspc(tokenizer: Any) -> Any:
    """`tokenizer` with a `<bkspc>` id (the next free id); the byte tokenizer gets id 259."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer if tokenizer.bkspc_token_id is not None else ByteTokenizer(bkspc=True)
    tokenizer.add_bkspc()
    check_bkspc_id(tokenizer, tokenizer.bkspc_token_id)
    return tokenizer


def check_bkspc_id(tokenizer: Any, bkspc_id: int | None) -> int:
    """`bkspc_id` if it is a `<bkspc>` id of `tokenizer` that no real token uses; ValueError otherwise."""
    if bkspc_id is None:
        raise ValueError("the tokenizer has no <bkspc> token; add it with hetsp.data.tokenizer.add_bkspc")
    specials = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    for what, i in specials.items():
        if i == bkspc_id:
            raise ValueError(f"<bkspc> id {bkspc_id} collides with the {what} token; <bkspc> needs an id of its own")
    if isinstance(tokenizer, ByteTokenizer):
        if bkspc_id < 256:
            raise ValueError(f"<bkspc> id {bkspc_id} collides with byte {bkspc_id}; the byte tokenizer's <bkspc> is 259")
    else:
        token = tokenizer.hf.convert_ids_to_tokens(int(bkspc_id))
        if token != BKSPC_TOKEN:
            raise ValueError(f"<bkspc> id {bkspc_id} is the tokenizer's token {token!r}; add <bkspc> with add_bkspc")
    if not 0 <= bkspc_id < tokenizer.vocab_size:
        raise ValueError(f"<bkspc> id {bkspc_id} is outside the vocabulary [0, {tokenizer.vocab_size})")
    return int(bkspc_id)


def load_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """``"bytes"`` or a local transformers tokenizer folder; ValueError if it cannot be loaded."""
    if name == "bytes":
        return ByteTokenizer()
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(
            f"data.tokenizer = {name!r}: no such folder. Use \"bytes\" for the built-in byte-level "
            "tokenizer, or the path of a local transformers tokenizer folder (tokenizer.json / "
            "tokenizer_config.json)."
        )
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError...)
        raise ValueError(
            f"data.tokenizer = {name!r}: cannot load a transformers tokenizer from this folder "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). It needs tokenizer.json "
            "or the files of a slow tokenizer plus tokenizer_config.json; or use \"bytes\"."
        ) from e
    return HFTokenizer(hf, str(path))
