"""Decoding with <bkspc>: scripted tokens and pops give the logits of the full forward of the resulting
structure; sampling never pops into the prompt."""

from __future__ import annotations

import pytest
import torch

from hetsp.backspace import stack_structure
from models.backspace_decoding import BackspaceDecoder

from .test_models import ALL_KINDS, tiny_model

BK = 40  # the last id of the tests' vocabulary of 41


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pattern", [ALL_KINDS, "attention", "s4d", "ema", "mamba2", "seqboat"])
def test_scripted_pops_match_full_forward(pattern):
    """Isolated pops, a run of pops back to the prompt, pushes after it; SeqBoat's window (3) wraps.
    fp64, rel 1e-9 (rounding of the chunked full forward against token-by-token decoding)."""
    model = tiny_model(pattern)
    prompt = [3, 17, 5]
    script = [7, 8, BK, 9, 11, 12, 13, 14, BK, BK, BK, BK, BK, 21, 22, BK, 23, 24, 25, 26, 27, BK, 28]
    dec = BackspaceDecoder(model, BK)
    with torch.no_grad():
        steps = [dec.prefill(prompt)] + [dec.step(t) for t in script]
        ids = prompt + script
        s = stack_structure(ids, BK, vocab_size=41, prompt_length=len(prompt))
        full = model(input_ids=torch.tensor([ids]), parents=torch.tensor([s.parents])).logits[0]
    got = torch.stack(steps[:1] + steps[1:])
    torch.testing.assert_close(got, full[len(prompt) - 1 :], rtol=1e-9, atol=1e-11)
    assert dec.stack == [ids[i] for i in s.context(len(ids) - 1)]


def test_pop_into_prompt_and_bad_id_are_refused():
    model = tiny_model("s4d")
    dec = BackspaceDecoder(model, BK)
    dec.prefill([1, 2])
    with pytest.raises(ValueError, match="only prompt tokens"):
        dec.step(BK)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        BackspaceDecoder(model, 41)


def test_sampling_keeps_the_prompt():
    model = tiny_model(ALL_KINDS)
    with torch.no_grad():
        model.lm_head.weight[BK] += 0.5  # make <bkspc> likely, so pops happen and get refused at the prompt
    dec = BackspaceDecoder(model, BK)
    actions = dec.generate([4, 5], 30, generator=torch.Generator().manual_seed(0))
    assert BK in actions
    assert dec.stack[:2] == [4, 5]
    ids = [4, 5] + actions
    s = stack_structure(ids, BK, vocab_size=41, prompt_length=2)  # raises if a pop reached the prompt
    ctx = s.context(len(ids) - 1)
    assert dec.stack == [ids[i] for i in (ctx[:-1] if ids[-1] == BK else ctx)]
