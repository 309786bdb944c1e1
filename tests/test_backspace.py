"""Stack structure of `<bkspc>` sequences: parents, depths, visibility, validation."""

import random

import pytest

from hetsp.backspace import StackStructure, is_plain, pack_structures, plain_structure, stack_structure, visible

from .backspace_fns import BK, random_backspace_ids


def _contexts_by_stack(ids, bk):
    """ctx(j) straight from the definition (a stack replayed for every j)."""
    out = []
    stack = []
    for j, t in enumerate(ids):
        if t == bk:
            stack.pop()
            out.append(stack + [j])
        else:
            stack.append(j)
            out.append(list(stack))
    return out


def test_structure_matches_stack_definition():
    rng = random.Random(0)
    for _ in range(200):
        n, prompt = rng.randint(1, 30), rng.randint(0, 4)
        prompt = min(prompt, n)
        ids = random_backspace_ids(rng, n, prompt, BK, p_pop=rng.choice([0.1, 0.4, 0.6]))
        s = stack_structure(ids, BK, vocab_size=10, prompt_length=prompt)
        ctxs = _contexts_by_stack(ids, BK)
        for j in range(n):
            assert s.context(j) == ctxs[j]
            assert s.depths[j] == len(ctxs[j]) - 1
            assert s.parents[j] == (ctxs[j][-2] if len(ctxs[j]) > 1 else -1)
            for i in range(n):
                # ancestor-or-self <=> i <= j < pop(i)
                assert visible(s, i, j) == (i in ctxs[j])


def test_run_of_pops():
    ids = [1, 2, 3, 4, BK, BK, BK, 5]
    s = stack_structure(ids, BK, vocab_size=10, prompt_length=1)
    assert s.parents == (-1, 0, 1, 2, 2, 1, 0, 0)
    assert s.depths == (0, 1, 2, 3, 3, 2, 1, 1)
    assert s.pops == (8, 6, 5, 4, 5, 6, 7, 8) and s.num_pops == 3
    assert not is_plain(s)


def test_plain_sequence_is_a_chain():
    s = stack_structure([1, 2, 3], BK, vocab_size=10)
    assert s == plain_structure(3) and is_plain(s)


def test_pack_offsets_parents():
    a = stack_structure([1, 2, BK], BK, vocab_size=10)
    b = stack_structure([3, 4], BK, vocab_size=10)
    p = pack_structures([a, b])
    assert p.parents == (-1, 0, 0, -1, 3)
    assert p.depths == (0, 1, 1, 0, 1)
    assert p.pops == (3, 2, 3, 2, 2) and p.num_pops == 1


@pytest.mark.parametrize(
    "ids,prompt,match",
    [([1, BK], 1, "prompt token 0"), ([BK, 1], 0, "empty stack"), ([1, 2, BK, BK], 1, "prompt token 0")],
)
def test_pop_into_prompt_is_refused(ids, prompt, match):
    with pytest.raises(ValueError, match=match):
        stack_structure(ids, BK, vocab_size=10, prompt_length=prompt)


def test_bkspc_outside_vocabulary_is_refused():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stack_structure([1, 2], 10, vocab_size=10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stack_structure([1, 2], -1, vocab_size=10)


def test_structure_is_frozen_data():
    s = stack_structure([1, 2, BK], BK, vocab_size=10)
    assert isinstance(s, StackStructure) and len(s) == 3
