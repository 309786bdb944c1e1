"""Random and hand-made `<bkspc>` structures for the tests (importable by the rank pool)."""

from __future__ import annotations

import random

BK = 9  # the <bkspc> id of the tests' small vocabularies (vocab_size >= 10)


def random_backspace_ids(rng: random.Random, n: int, prompt: int, bk: int = BK, vocab: int = 8, p_pop: float = 0.25) -> list[int]:
    """A valid random sequence of n tokens: isolated pops and runs of pops, never into the prompt."""
    ids, generated = [], 0
    for j in range(n):
        if j >= prompt and generated > 0 and rng.random() < p_pop:
            ids.append(bk)
            generated -= 1
        else:
            ids.append(rng.randrange(vocab))
            generated += j >= prompt
    return ids


def deep_pop_ids(n: int, bk: int = BK, vocab: int = 8) -> list[int]:
    """n tokens: the first half pushed, then a run of pops back to a quarter of the sequence, then pushes.

    On a group of d ranks (2d zigzag chunks), the tokens after the run have their parent
    several chunks (and shards) back, and pops fall right at chunk boundaries."""
    half, back = n // 2, n // 4
    ids = [(3 * j + 1) % vocab for j in range(half)]
    ids += [bk] * min(half - back, n - half)
    ids += [(5 * j + 2) % vocab for j in range(n - len(ids))]
    return ids


def inserted_pairs_ids(rng: random.Random, n: int, frac: float, bk: int = BK, vocab: int = 8) -> list[int]:
    """n tokens in which about `frac` of the positions are inserted (wrong token, <bkspc>) pairs."""
    ids: list[int] = []
    while len(ids) < n:
        if len(ids) >= 1 and len(ids) + 2 <= n and rng.random() < frac:
            ids += [rng.randrange(vocab), bk]
        else:
            ids.append(rng.randrange(vocab))
    return ids
