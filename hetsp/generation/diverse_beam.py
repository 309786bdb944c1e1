"""Diverse Beam Search (Vijayakumar et al.; REFERENCE.md section 6) for any causal LM with `.logits`.

The beam budget B is split into G groups of B' = B / G beams. At each step the
groups advance in order; group g ranks a candidate token v for one of its beams by

    beam score + log p(v | beam) - lambda * (number of beams of groups 1..g-1 that chose v at this step)

(Hamming diversity) and keeps its best B' candidates, like beam search. A beam's
score is the running sum of these augmented step scores (so group 1, with no
earlier group, is plain beam search on log-probabilities). A beam that emitted
`eos_token_id` is finished: it stays in its group with its score and is not
extended. No length normalisation. Every forward is a whole-prefix forward
(no cache) through hetsp's packed layout, so any model hetsp runs works unchanged.
It runs on one rank by itself (no collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from hetsp.generation.sampling import packed_last_logits


@dataclass
class Beam:
    tokens: list[int]  # generated tokens only (the prompt excluded)
    score: float
    finished: bool = False


def _next_log_probs(model: Any, prompt: Sequence[int], beams: list[Beam], device: Any, kernel: str) -> torch.Tensor:
    """log p(next token) for each beam, (n, V) in fp64, from one packed forward (a group of one)."""
    logits = packed_last_logits(model, [list(prompt) + b.tokens for b in beams], 0, device, kernel, local=True)
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


@torch.no_grad()
def diverse_beam_search(
    model: Any,
    prompt: Sequence[int],
    num_beams: int,
    num_groups: int,
    diversity: float = 0.5,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
    device: Any = "cpu",
    kernel: str = "auto",
) -> list[list[Beam]]:
    """The beams of every group after `max_new_tokens` steps (or when all finished), best first."""
    if num_groups < 1 or num_beams < num_groups or num_beams % num_groups:
        raise ValueError(f"num_beams ({num_beams}) must be a positive multiple of num_groups ({num_groups})")
    if diversity < 0:
        raise ValueError(f"diversity must be >= 0, got {diversity}")
    if not prompt:
        raise ValueError("diverse_beam_search needs a prompt of at least one token")
    width = num_beams // num_groups
    groups: list[list[Beam]] = [[Beam([], 0.0)] for _ in range(num_groups)]
    for _ in range(max_new_tokens):
        if all(b.finished for g in groups for b in g):
            break
        chosen_count: torch.Tensor | None = None  # (V,) tokens chosen at this step by earlier groups
        for g in range(num_groups):
            beams = groups[g]
            active = [b for b in beams if not b.finished]
            cands: list[tuple[float, Beam, int | None]] = [(b.score, b, None) for b in beams if b.finished]
            if active:
                logp = _next_log_probs(model, prompt, active, device, kernel)
                if chosen_count is None:
                    chosen_count = torch.zeros(logp.shape[1], dtype=torch.float64, device=logp.device)
                step = logp - diversity * chosen_count
                total = step + torch.tensor([b.score for b in active], dtype=torch.float64, device=logp.device)[:, None]
                k = min(width, total.numel())
                top = torch.topk(total.flatten(), k)
                V = logp.shape[1]
                for val, idx in zip(top.values.tolist(), top.indices.tolist()):
                    cands.append((val, active[idx // V], idx % V))
            cands.sort(key=lambda c: -c[0])
            new: list[Beam] = []
            for score, beam, tok in cands[:width]:
                if tok is None:
                    new.append(beam)
                else:
                    new.append(Beam(beam.tokens + [tok], score, eos_token_id is not None and tok == eos_token_id))
                    chosen_count[tok] += 1
            groups[g] = new
    return [sorted(g, key=lambda b: -b.score) for g in groups]
