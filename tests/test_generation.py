"""Decoding with HybridCache: incremental logits equal the full forward; greedy generate() works."""

from __future__ import annotations

import pytest
import torch

from models import HybridCache

from .test_models import ALL_KINDS, tiny_model

SPLITS = [(0, 5), (5, 6), (6, 7), (7, 13), (13, 14)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pattern", [ALL_KINDS, "attention", "s4d", "ema", "mamba2", "seqboat"])
def test_incremental_decoding_equals_full_forward(pattern):
    # A window of 3 activated tokens and several SeqBoat steps make the prefix buffer wrap.
    model = tiny_model(pattern)
    torch.manual_seed(3)
    ids = torch.randint(0, 41, (2, 14))
    full = model(input_ids=ids).logits
    cache = None
    pieces = []
    for a, b in SPLITS:
        out = model(input_ids=ids[:, a:b], cache=cache, use_cache=True)
        cache = out.cache
        pieces.append(out.logits)
    assert isinstance(cache, HybridCache) and cache.get_seq_length() == 14
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)


def test_greedy_generate_matches_step_by_step_argmax():
    model = tiny_model()
    torch.manual_seed(4)
    prompt = torch.randint(0, 41, (2, 5))
    fed = []
    model.model.embed_tokens.register_forward_hook(lambda mod, args, out: fed.append(args[0].shape[1]))
    generated = model.generate(prompt, max_new_tokens=7, do_sample=False)
    assert generated.shape == (2, 12)
    assert fed == [5] + [1] * 6  # the prompt once, then one token per step: the cache is used
    fed.clear()
    seq = prompt
    for _ in range(7):
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    torch.testing.assert_close(generated, seq, rtol=0, atol=0)


def test_cache_with_packed_rows_is_rejected():
    model = tiny_model("mamba2")
    with pytest.raises(ValueError, match="unpacked rows"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 4]), use_cache=True)


def test_padded_batch_of_attention_layers_matches_one_prompt_at_a_time():
    """Attention-only layers honour the mask: a left-padded prompt's logits equal the prompt alone."""
    model = tiny_model("attention")
    torch.manual_seed(6)
    short, long = torch.randint(1, 41, (4,)), torch.randint(1, 41, (7,))
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0, 3:], ids[1] = short, long
    mask = (torch.arange(7)[None] >= torch.tensor([[3], [0]])).long()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    batched = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    # fp64 model: equal up to summation order
    torch.testing.assert_close(batched[0, 3:], model(input_ids=short[None]).logits[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(batched[1], model(input_ids=long[None]).logits[0], rtol=1e-10, atol=1e-10)
