"""Padded batches: every mixer honours attention_mask, so a padded prompt equals the prompt alone.

Left-padded prompts of different lengths (random tokens under the pads, so anything the pads
leaked would show) must give, at their real positions, the logits of each prompt run alone; then
greedy decoding with the cache (through `generate` and through a manual loop) must give the same
tokens and the same logits at every step. Tolerance: the models are fp64 and a padded row runs
the same recurrences on a different chunk layout (other summation order), so results agree to
round-off: atol = rtol = 1e-10, far above fp64 round-off (~1e-15) and far below any effect of a
pad (the refused implementation was off by 18-108% relative).
"""

from __future__ import annotations

import pytest
import torch

from models import HybridCache

pytestmark = pytest.mark.usefixtures("one_thread")
from .test_models import ALL_KINDS, tiny_model

TOL = dict(rtol=1e-10, atol=1e-10)  # fp64, different chunk layouts: round-off only (see module docstring)
LENGTHS = (3, 9, 6, 1)  # longer than the chunk size (4), the SeqBoat window (3) and the conv width (4), and shorter
NEW_TOKENS = 6


def _padded_model(pattern):
    """tiny_model with random biases: zero-initialised biases would hide a pad that slips through
    (a zero input with zero biases routes to 'not activated' and leaves a zero state zero)."""
    model = tiny_model(pattern)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "beta")):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def _prompts(seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 41, (n,), generator=g) for n in LENGTHS]


def _left_padded(prompts, seed=8):
    """ids (B, T) with random tokens under the pads, mask (B, T), pads per row."""
    g = torch.Generator().manual_seed(seed)
    width = max(len(p) for p in prompts)
    ids = torch.randint(0, 41, (len(prompts), width), generator=g)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    pads = []
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
        pads.append(width - len(p))
    return ids, mask, pads


def _alone(model, prompt):
    """Greedy decoding of one prompt, token by token with the cache: prompt logits, tokens, step logits."""
    out = model(input_ids=prompt[None], use_cache=True)
    prompt_logits, cache = out.logits[0], out.cache
    logits, tokens = [out.logits[0, -1]], []
    for _ in range(NEW_TOKENS):
        nxt = logits[-1].argmax(-1)
        tokens.append(int(nxt))
        if len(tokens) == NEW_TOKENS:
            break
        out = model(input_ids=nxt.view(1, 1), cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits[0, -1])
    return prompt_logits, tokens, torch.stack(logits)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("pattern", [ALL_KINDS, "attention", "s4d", "ema", "mamba2", "seqboat"])
def test_left_padded_batch_equals_each_prompt_alone(pattern, impl):
    """Each mixer alone and all five together: prompt logits, manual cached loop and generate()."""
    model = _padded_model(pattern)
    model.config._attn_implementation = impl
    prompts = _prompts()
    ids, mask, pads = _left_padded(prompts)
    refs = [_alone(model, p) for p in prompts]

    # Prompt logits at the real positions (positions derived from the mask by the model).
    batched = model(input_ids=ids, attention_mask=mask).logits
    for i, (prompt_logits, _, _) in enumerate(refs):
        torch.testing.assert_close(batched[i, pads[i] :], prompt_logits, **TOL)

    # Manual loop: prefill with the mask, then one token per step with the cache, mask grown by ones.
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache, step_logits, seq_mask = out.cache, [out.logits[:, -1]], mask
    assert isinstance(cache, HybridCache)
    for _ in range(NEW_TOKENS - 1):
        nxt = step_logits[-1].argmax(-1, keepdim=True)
        seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)], 1)
        out = model(input_ids=nxt, attention_mask=seq_mask, cache=cache, use_cache=True)
        cache = out.cache
        step_logits.append(out.logits[:, -1])
    step_logits = torch.stack(step_logits, 1)
    for i, (_, tokens, logits) in enumerate(refs):
        torch.testing.assert_close(step_logits[i], logits, **TOL)
        assert step_logits[i].argmax(-1).tolist() == tokens

    # generate() with the mask: same tokens and the same logits at every step.
    gen = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )
    gen_logits = torch.stack(gen.logits, 1)
    for i, (_, tokens, logits) in enumerate(refs):
        assert gen.sequences[i, ids.shape[1] :].tolist() == tokens
        # generate() hands back float32 copies of the fp64 logits: equal up to one float32 rounding.
        torch.testing.assert_close(gen_logits[i], logits.float(), rtol=1e-6, atol=1e-6)


def test_unmasked_pads_do_change_the_logits():
    """Guards the comparison above: without the mask the same padded rows do differ from the prompts alone."""
    model = _padded_model(ALL_KINDS)
    prompts = _prompts()
    ids, _, pads = _left_padded(prompts)
    unmasked = model(input_ids=ids).logits
    alone = model(input_ids=prompts[0][None]).logits[0]
    assert (unmasked[0, pads[0] :] - alone).abs().max() > 1e-3


def test_right_padded_batch_without_cache_equals_each_prompt_alone():
    """Training-style batches: right padding leaves every real position exact (causal mixers)."""
    model = _padded_model(ALL_KINDS)
    prompts = _prompts()
    ids, _, _ = _left_padded(prompts)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
        mask[i, : len(p)] = 1
    # Positions must come from the mask here too: position_ids None.
    batched = model(input_ids=ids, attention_mask=mask).logits
    for i, p in enumerate(prompts):
        torch.testing.assert_close(batched[i, : len(p)], model(input_ids=p[None]).logits[0], **TOL)


def test_padding_that_cannot_be_exact_is_refused():
    model = tiny_model()
    ids = torch.randint(0, 41, (2, 6))
    right = torch.ones(2, 6, dtype=torch.long)
    right[1, 4:] = 0
    with pytest.raises(ValueError, match="right padding with a cache"):
        model(input_ids=ids, attention_mask=right, use_cache=True)
    gap = torch.ones(2, 6, dtype=torch.long)
    gap[0, 2] = 0
    with pytest.raises(ValueError, match="pads between real tokens"):
        model(input_ids=ids, attention_mask=gap)
    with pytest.raises(ValueError, match="packed rows"):
        model(input_ids=ids[:1], attention_mask=gap[:1], cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"must be \(batch=2, past \+ length=6\)"):
        model(input_ids=ids, attention_mask=gap[:, 1:])
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="needs attention implementation 'eager' or 'sdpa'"):
        model(input_ids=ids, attention_mask=right)
