"""Decoding with a `<bkspc>` action for `HybridForCausalLM` (one sequence, batch of one).

A `<bkspc>` pops the last generated token (never a prompt token): the attention cache is
cropped to the stack's depth, and every recurrent, convolution and SeqBoat state goes
back to the parent's. States are kept, not recomputed: after each push the decoder
remembers the references to each layer's non-attention cache tensors (the mixers
replace those tensors, never modify them in place, so a reference is a snapshot at no
copy); keys and values are only cropped, so attention memory stays that of the stack.
Extra memory: one set of SSM states per stacked generated token.

The logits at a `<bkspc>` are the model's output on the stack followed by the `<bkspc>`
itself (its context, hetsp/backspace.py), after which the state returns to the stack's.
"""

from __future__ import annotations

import torch

from .cache import HybridCache

_KV = ("key", "value")


class BackspaceDecoder:
    """Step a model through tokens and pops.

        dec = BackspaceDecoder(model, bkspc_id)
        logits = dec.prefill(prompt_ids)        # (V,) logits after the prompt
        logits = dec.step(token)                # push a token, or pop when token == bkspc_id
    """

    def __init__(self, model, bkspc_id: int):
        vocab = model.config.vocab_size
        if not (0 <= bkspc_id < vocab):
            raise ValueError(f"<bkspc> id {bkspc_id} is outside the vocabulary [0, {vocab}); add it to the model's embedding first")
        self.model = model
        self.bkspc_id = bkspc_id
        self.cache: HybridCache | None = None
        self.stack: list[int] = []
        self.prompt_length = 0
        self._snapshots: list[list[dict]] = []  # per generated stack element: each layer's non-KV entries after it

    def _forward(self, token: int) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = self.model(input_ids=torch.tensor([[token]], device=device), cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[0, -1]

    def _snapshot(self) -> list[dict]:
        return [{k: v for k, v in entry.items() if k not in _KV} for entry in self.cache.layers]

    def _restore(self, snapshot: list[dict], depth: int) -> None:
        for entry, saved in zip(self.cache.layers, snapshot):
            kv = {k: entry[k][:, :, :depth] for k in _KV if k in entry}
            entry.clear()
            entry.update(saved)
            entry.update(kv)
        self.cache.seen_tokens = depth

    def prefill(self, prompt_ids) -> torch.Tensor:
        """Run the prompt (at least one token, no `<bkspc>`); returns the logits after it."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids or self.bkspc_id in prompt_ids:
            raise ValueError("the prompt must hold at least one token and no <bkspc>")
        device = next(self.model.parameters()).device
        out = self.model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
        self.cache = out.cache
        self.stack = list(prompt_ids)
        self.prompt_length = len(prompt_ids)
        self._prompt_snapshot = self._snapshot()
        self._snapshots = []
        return out.logits[0, -1]

    def can_pop(self) -> bool:
        return len(self.stack) > self.prompt_length

    def step(self, token: int) -> torch.Tensor:
        """Feed one action; returns the logits at it (for a `<bkspc>`: on the popped stack plus the `<bkspc>`)."""
        if self.cache is None:
            raise ValueError("call prefill(prompt_ids) first")
        token = int(token)
        if token != self.bkspc_id:
            logits = self._forward(token)
            self.stack.append(token)
            self._snapshots.append(self._snapshot())
            return logits
        if not self.can_pop():
            raise ValueError("<bkspc> with only prompt tokens on the stack: a <bkspc> may only delete generated tokens")
        self.stack.pop()
        self._snapshots.pop()
        parent = self._snapshots[-1] if self._snapshots else self._prompt_snapshot
        self._restore(parent, len(self.stack))
        logits = self._forward(token)
        self._restore(parent, len(self.stack))
        return logits

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> list[int]:
        """Sample `max_new_tokens` actions over the vocabulary (which holds `<bkspc>`); a `<bkspc>` is never
        sampled while only prompt tokens are on the stack. Returns the actions; `self.stack` is the text."""
        logits = self.prefill(prompt_ids)
        actions = []
        for _ in range(max_new_tokens):
            scores = logits.float() / temperature
            if not self.can_pop():
                scores = scores.clone()
                scores[self.bkspc_id] = float("-inf")
            token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))
            actions.append(token)
            logits = self.step(token)
        return actions
