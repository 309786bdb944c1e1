"""Diverse Beam Search (Vijayakumar et al.; REFERENCE.md section 6) for any causal LM with `.logits`.

The beam budget B is split into G groups of B' = B / G beams. At each step the
groups advance in order; group g ranks a candidate token v for one of its beams by

    beam score + log p(v | beam) - lambda * (number of beams of groups 1..g-1 that chose v at this step)

(Hamming diversity) and keeps its best B' candidates, like beam search. A beam's
score is the running sum of these augmented step scores (so group 1, with no
earlier group, is plain beam search on log-probabilities). A beam that emitted
`eos_token_id` is finished: it stays in its group with its score and is not
extended. No length normalisation. Decoding uses the model's cache, reordered by
beam (`hetsp.generation.decoding`). It runs on one rank by itself (no collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class Beam:
    tokens: list[int]  # generated tokens only (the prompt excluded)
    score: float
    finished: bool = False


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
    use_cache: bool = True,
) -> list[list[Beam]]:
    """The beams of every group after `max_new_tokens` steps (or when all finished), best first.

    All groups' unfinished beams run as the rows of one decoder (`decoding.make_decoder`: the
    model's cache, reordered by each new beam's parent, or packed full forwards with
    `use_cache=False`), one forward per step: a step's log-probabilities depend only on the
    beams' prefixes, so the groups' sequential choices need no extra forward."""
    from hetsp.generation.decoding import make_decoder

    if num_groups < 1 or num_beams < num_groups or num_beams % num_groups:
        raise ValueError(f"num_beams ({num_beams}) must be a positive multiple of num_groups ({num_groups})")
    if diversity < 0:
        raise ValueError(f"diversity must be >= 0, got {diversity}")
    if not prompt:
        raise ValueError("diverse_beam_search needs a prompt of at least one token")
    width = num_beams // num_groups
    groups: list[list[Beam]] = [[Beam([], 0.0)] for _ in range(num_groups)]
    with make_decoder(model, device, kernel, local=True, use_cache=use_cache) as dec:
        logp = torch.log_softmax(dec.start([list(prompt)]).to(torch.float64), dim=-1)
        rows = {id(groups[0][0]): 0}  # decoder row of each unfinished beam; every group starts from row 0
        for g in groups[1:]:
            rows[id(g[0])] = 0
        for t in range(max_new_tokens):
            chosen_count = torch.zeros(logp.shape[1], dtype=torch.float64, device=logp.device)  # this step's earlier-group tokens
            parents: list[int] = []
            tokens: list[int] = []
            new_rows: dict[int, int] = {}
            for g in range(num_groups):
                beams = groups[g]
                active = [b for b in beams if not b.finished]
                cands: list[tuple[float, Beam, int | None]] = [(b.score, b, None) for b in beams if b.finished]
                if active:
                    step = logp[[rows[id(b)] for b in active]] - diversity * chosen_count
                    total = step + torch.tensor([b.score for b in active], dtype=torch.float64, device=logp.device)[:, None]
                    top = torch.topk(total.flatten(), min(width, total.numel()))
                    V = logp.shape[1]
                    for val, idx in zip(top.values.tolist(), top.indices.tolist()):
                        cands.append((val, active[idx // V], idx % V))
                cands.sort(key=lambda c: -c[0])
                new: list[Beam] = []
                for score, beam, tok in cands[:width]:
                    if tok is None:
                        new.append(beam)
                        continue
                    child = Beam(beam.tokens + [tok], score, eos_token_id is not None and tok == eos_token_id)
                    new.append(child)
                    chosen_count[tok] += 1
                    if not child.finished:
                        new_rows[id(child)] = len(parents)
                        parents.append(rows[id(beam)])
                        tokens.append(tok)
                groups[g] = new
            if not parents or t == max_new_tokens - 1:
                break
            logp = torch.log_softmax(dec.advance(parents, tokens).to(torch.float64), dim=-1)
            rows = new_rows
    return [sorted(g, key=lambda b: -b.score) for g in groups]
