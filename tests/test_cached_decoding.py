"""Cached incremental decoding (hetsp/generation/decoding.py) against the full forward, every family.

Every family hetsp runs (the hybrid model with all five mixer kinds, stock Llama, Qwen2 and
Mistral, Bamba and GraniteMoeHybrid) is built with hetsp's ring attention, as training builds it,
in fp64. A batch of prompts of different lengths (left-padded by the decoder) is decoded with the
cache; each step's logits must equal the full forward of that row's prefix alone, and sampling
with a fixed generator must draw the same tokens cached and uncached (packed full forwards), for
sampling and for Diverse Beam Search (whose beams reorder the cache).

Tolerance: fp64 models; the cached step and the full forward sum in a different order (a chunked
scan against one recurrence step, a padded row against an unpadded one), so they agree to
round-off: atol = rtol = 1e-9, far above fp64 round-off (~1e-14 here) and far below any real
error (a pad leaking or a position off by one changes logits by more than 1e-3).
"""

from __future__ import annotations

import types

import pytest
import torch

from hetsp.generation.decoding import CachedDecoder, FullForwardDecoder, cached_decoding_supported, make_decoder
from hetsp.generation.diverse_beam import diverse_beam_search
from hetsp.generation.sampling import sample_in_lockstep

from .test_models import ALL_KINDS, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(rtol=1e-9, atol=1e-9)  # fp64, other summation order (module docstring)
# transformers' recurrent step for Bamba / GraniteMoeHybrid (mamba2_selective_state_update in their
# modeling files) computes the decay exp(dt A) in float32 even in an fp64 model, while their chunked
# scan keeps fp64: one float32 rounding (~6e-8 relative) of the decay per step, so these two compare
# at float32 level. The full forward itself is the fp64 reference either way.
TOL_FP32_DECAY = dict(rtol=1e-6, atol=1e-7)
FAMILY_TOL = {"bamba": TOL_FP32_DECAY, "granitemoehybrid": TOL_FP32_DECAY}
VOCAB = 41
LENGTHS = (5, 9, 1, 7)  # past the conv width (4), SeqBoat's window (3), a Mamba chunk (4); and a one-token prompt
NEW_TOKENS = 7


def _rms_fp64(self, hidden_states, gate=None):
    """transformers' RMSNorms compute in float32 whatever the input; in fp64 tests they must not
    (that would cap every comparison at float32 rounding)."""
    if gate is not None:
        hidden_states = hidden_states * torch.nn.functional.silu(gate)
    group = getattr(self, "group_size", hidden_states.shape[-1])
    *prefix, last = hidden_states.shape
    h = hidden_states.view(*prefix, last // group, group)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h.view(*prefix, last)


def _hf_config(family):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=6)  # shorter than the rows: the window matters
    from hetsp.config import ModelConfig
    from hetsp.model_registry import build_hf_config

    cfg = ModelConfig(family=family, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64,
                      max_position_embeddings=256,
                      extra={"attn_layer_indices": [1], "mamba_chunk_size": 4, "mamba_d_state": 8, "mamba_n_heads": 4})
    return build_hf_config(cfg, VOCAB)


def family_model(family, seed=0):
    """A tiny fp64 model of `family` with hetsp's ring attention and parallelized SSM layers, as
    training builds it; random biases so a pad that leaks would show."""
    from transformers import AutoModelForCausalLM

    from hetsp.attention import register_attention
    from hetsp.ssm_parallel import parallelize

    torch.manual_seed(seed)
    if family == "hybrid":
        import models

        cfg = tiny_config(ALL_KINDS)
        cfg._attn_implementation = register_attention()
        model = models.HybridForCausalLM(cfg)
    else:
        cfg = _hf_config(family)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register_attention())
    model = model.to(torch.float64).eval()
    for m in model.modules():
        if type(m).__name__.endswith(("RMSNorm", "RMSNormGated")) and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_rms_fp64, m)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "beta")):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return parallelize(model)


FAMILIES = ["hybrid", "llama", "qwen2", "mistral", "bamba", "granitemoehybrid"]


def _prompts(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def _full_last_logits(model, row):
    """The reference: the full forward of one row alone (hetsp's packed path, a group of one)."""
    with FullForwardDecoder(model, "cpu", "reference", local=True) as dec:
        return dec.start([row])[0]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, family_model(request.param)


@torch.no_grad()
def test_each_cached_step_equals_the_full_forward_of_its_prefix(family):
    """Prompts of lengths 5, 9, 1, 7 in one batch; random tokens fed for 7 steps; rows reordered
    (one dropped, one duplicated) halfway, as beams and finished samples do."""
    name, model = family
    assert cached_decoding_supported(model)
    rows = _prompts()
    g = torch.Generator().manual_seed(11)
    seen = []  # (step, row, cached logits)
    with CachedDecoder(model, "cpu") as dec:
        logits = dec.start(rows)
        assert model.config._attn_implementation == "sdpa"
        for step in range(NEW_TOKENS):
            seen += [(step, r, got) for r, got in zip(rows, logits)]
            parents = list(range(len(rows)))
            if step == 3:
                parents = [3, 0, 0, 2]  # row 1 dropped, row 0 twice, order changed
            tokens = torch.randint(1, VOCAB, (len(parents),), generator=g).tolist()
            rows = [rows[p] + [t] for p, t in zip(parents, tokens)]
            logits = dec.advance(parents, tokens)
    assert model.config._attn_implementation == "hetsp_ring"  # restored for training
    for step, r, got in seen:
        torch.testing.assert_close(got, _full_last_logits(model, r), **FAMILY_TOL.get(name, TOL),
                                   msg=lambda m: f"{name}, step {step}: {m}")


@torch.no_grad()
def test_sampling_draws_the_same_tokens_cached_and_uncached(family):
    name, model = family
    prompts = _prompts(5)[:3]
    kw = dict(temperature=0.9, top_p=0.9, eos_token_id=4, kernel="reference")
    cached = sample_in_lockstep(model, prompts, 3, NEW_TOKENS, torch.Generator().manual_seed(7), **kw)
    full = sample_in_lockstep(model, prompts, 3, NEW_TOKENS, torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert cached == full


@torch.no_grad()
def test_diverse_beam_search_is_the_same_cached_and_uncached(family):
    name, model = family
    prompt = _prompts(9)[1]
    cached = diverse_beam_search(model, prompt, 6, 3, 0.7, 6, eos_token_id=4, kernel="reference")
    full = diverse_beam_search(model, prompt, 6, 3, 0.7, 6, eos_token_id=4, kernel="reference", use_cache=False)
    assert [[b.tokens for b in g] for g in cached] == [[b.tokens for b in g] for g in full]
    for gc, gf in zip(cached, full):
        for bc, bf in zip(gc, gf):
            assert bc.finished == bf.finished
            tol = FAMILY_TOL.get(name, TOL)
            assert bc.score == pytest.approx(bf.score, rel=tol["rtol"], abs=tol["atol"])


def test_full_forward_decoder_refuses_attention_that_would_mix_rows():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_hf_config("llama"), attn_implementation="sdpa")
    with pytest.raises(ValueError, match="rows see each other"):
        FullForwardDecoder(model, "cpu", "reference")
    assert isinstance(make_decoder(model, "cpu", "reference"), CachedDecoder)


def test_decoder_rejects_empty_rows_and_mismatched_steps():
    model = family_model("llama")
    with CachedDecoder(model, "cpu") as dec:
        with pytest.raises(ValueError, match="a token in every row"):
            dec.start([[1, 2], []])
        dec.start([[1, 2]])
        with pytest.raises(ValueError, match="one token per kept row"):
            dec.advance([0], [1, 2])
