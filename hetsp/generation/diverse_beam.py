"""Diverse Beam Search (Vijayakumar et al.; REFERENCE.md section 6) for any causal LM with `.logits`.

The beam budget B is split into G groups of B' = B / G beams. At each step the
groups advance in order; group g ranks a candidate token v for one of its beams by

    beam score + log p(v | beam) - lambda * (number of beams of groups 1..g-1 that chose v at this step)

(Hamming diversity) and keeps its best B' candidates, like beam search. A beam's
score is the running sum of these augmented step scores (so group 1, with no
earlier group, is plain beam search on log-probabilities). A beam that emitted
`eos_token_id` is finished: it stays in its group with its score and is not
extended. No length normalisation. Decoding uses the model's cache, reordered by
beam (`hetsp.generation.decoding`).

`diverse_beam_search` decodes one prompt on one rank by itself (no collective);
`diverse_beam_in_lockstep` decodes each rank's own prompts, one after the other, while every
rank runs the same number of forwards (ZeRO-3 gathers parameters inside each forward), with
the same forwards per prompt as `diverse_beam_search`, so the same beams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass
class Beam:
    tokens: list[int]  # generated tokens only (the prompt excluded)
    score: float
    finished: bool = False


class DiverseBeams:
    """One prompt's search, fed one forward's logits at a time: `step(logits)` chooses every
    group's beams from the logits of the decoder rows and answers the next forward
    (`dec.advance(parents, tokens)`), or None when the search is over (`result()`)."""

    def __init__(self, prompt: Sequence[int], num_beams: int, num_groups: int, diversity: float,
                 max_new_tokens: int, eos_token_id: int | None) -> None:
        if num_groups < 1 or num_beams < num_groups or num_beams % num_groups:
            raise ValueError(f"num_beams ({num_beams}) must be a positive multiple of num_groups ({num_groups})")
        if diversity < 0:
            raise ValueError(f"diversity must be >= 0, got {diversity}")
        if not prompt:
            raise ValueError("diverse_beam_search needs a prompt of at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.prompt = list(prompt)
        self.width = num_beams // num_groups
        self.diversity, self.max_new_tokens, self.eos_token_id = diversity, max_new_tokens, eos_token_id
        self.groups: list[list[Beam]] = [[Beam([], 0.0)] for _ in range(num_groups)]
        self.rows = {id(g[0]): 0 for g in self.groups}  # decoder row of each unfinished beam; all start from row 0
        self.t = 0

    def step(self, logits: torch.Tensor) -> tuple[list[int], list[int]] | None:
        logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
        V = logp.shape[1]
        chosen_count = torch.zeros(V, dtype=torch.float64, device=logp.device)  # this step's earlier-group tokens
        parents: list[int] = []
        tokens: list[int] = []
        new_rows: dict[int, int] = {}
        for g, beams in enumerate(self.groups):
            active = [b for b in beams if not b.finished]
            cands: list[tuple[float, Beam, int | None]] = [(b.score, b, None) for b in beams if b.finished]
            if active:
                step = logp[[self.rows[id(b)] for b in active]] - self.diversity * chosen_count
                total = step + torch.tensor([b.score for b in active], dtype=torch.float64, device=logp.device)[:, None]
                top = torch.topk(total.flatten(), min(self.width, total.numel()))
                for val, idx in zip(top.values.tolist(), top.indices.tolist()):
                    cands.append((val, active[idx // V], idx % V))
            cands.sort(key=lambda c: -c[0])
            new: list[Beam] = []
            for score, beam, tok in cands[: self.width]:
                if tok is None:
                    new.append(beam)
                    continue
                child = Beam(beam.tokens + [tok], score, self.eos_token_id is not None and tok == self.eos_token_id)
                new.append(child)
                chosen_count[tok] += 1
                if not child.finished:
                    new_rows[id(child)] = len(parents)
                    parents.append(self.rows[id(beam)])
                    tokens.append(tok)
            self.groups[g] = new
        self.t += 1
        self.rows = new_rows
        if not parents or self.t == self.max_new_tokens:
            return None
        return parents, tokens

    def result(self) -> list[list[Beam]]:
        return [sorted(g, key=lambda b: -b.score) for g in self.groups]


def _decode(model: Any, searches: Sequence[DiverseBeams], device: Any, kernel: str, use_cache: bool,
            any_rank: Callable[[bool], bool], placeholder_token: int = 0) -> list[list[list[Beam]]]:
    """Run `searches` one after the other on one decoder, one forward per round: a search's
    prompt (`dec.start`), then its steps (`dec.advance`). A round runs only while `any_rank`
    says some rank has a forward to run; a rank with none runs `dec.idle`."""
    from hetsp.generation.decoding import make_decoder

    pending = list(reversed(searches))
    current: DiverseBeams | None = None
    request: tuple[list[int], list[int]] | None = None  # the current search's next `advance`; None: its start
    with make_decoder(model, device, kernel, local=True, use_cache=use_cache) as dec:
        while True:
            if current is None and pending:
                current, request = pending.pop(), None
            if not any_rank(current is not None):
                break
            if current is None:
                dec.idle(placeholder_token)
                continue
            logits = dec.start([current.prompt]) if request is None else dec.advance(*request)
            request = current.step(logits)
            if request is None:
                current = None
    return [s.result() for s in searches]


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
    search = DiverseBeams(prompt, num_beams, num_groups, diversity, max_new_tokens, eos_token_id)
    return _decode(model, [search], device, kernel, use_cache, lambda busy: busy)[0]


@torch.no_grad()
def diverse_beam_in_lockstep(
    model: Any,
    prompts: Sequence[Sequence[int]],
    num_beams: int,
    num_groups: int,
    diversity: float = 0.5,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
    device: Any = "cpu",
    kernel: str = "auto",
    use_cache: bool = True,
    placeholder_token: int = 0,
) -> list[list[list[Beam]]]:
    """`diverse_beam_search` of each of this rank's `prompts` (possibly none), one after the
    other. Every rank of the world must call it: each round, one all-reduce says whether any rank
    still has a forward to run, and a rank with none runs the decoder's idle forward, so every
    rank runs the same number of forwards (ZeRO-3's parameter gathers stay matched). A prompt's
    forwards are those of `diverse_beam_search`, whichever rank decodes it and whatever else that
    rank decodes, so its beams are the same."""
    from hetsp.generation.sampling import _any_rank

    searches = [DiverseBeams(p, num_beams, num_groups, diversity, max_new_tokens, eos_token_id) for p in prompts]
    return _decode(model, searches, device, kernel, use_cache, lambda busy: _any_rank(busy, device), placeholder_token)
