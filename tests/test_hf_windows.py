"""Sliding windows and attention logit softcapping of stock models under ring attention equal
the stock model in one process (logits and every gradient, fp64).

transformers' eager attention takes its softmax in float32 (observed differences ~5e-8 from
an fp64 softmax, ~2e-6 in gradients), so against eager the tolerance is 1e-5; an off-by-one
window or a dropped softcap moves logits by ~1e-2 (test_window_off_by_one_is_visible). Mistral
and Qwen2 under the ring are compared with sdpa, which builds the same sliding-window mask
and stays in fp64 (1e-9); Gemma2 (softcap: no sdpa) with eager."""

import copy

import pytest
import torch

from .test_llama_ring import ring_matches_one_process

WINDOW = 16
MAX_LEN = 41  # sequences up to 41 tokens, longer than the window


def _common(**kw):
    return dict(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, attention_dropout=0.0, **kw,
    )


def mistral(kv_heads=2):
    from transformers import MistralConfig

    return MistralConfig(**_common(num_key_value_heads=kv_heads, sliding_window=WINDOW))


def qwen2(kv_heads=2):
    from transformers import Qwen2Config

    return Qwen2Config(**_common(num_key_value_heads=kv_heads, use_sliding_window=True, sliding_window=WINDOW,
                                 layer_types=["full_attention", "sliding_attention"]))


def gemma2(softcap=50.0, kv_heads=2):
    from transformers import Gemma2Config

    return Gemma2Config(**_common(num_key_value_heads=kv_heads, head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=softcap,
                                  query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"]))


def _eager_logits(cfg, ids):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").double()
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


def _assert_feature_changes_output(cfg, **without):
    """The test is sensitive: the same weights without the feature give other logits."""
    ids = torch.randint(0, cfg.vocab_size, (MAX_LEN,), generator=torch.Generator().manual_seed(3))
    plain = type(cfg)(**{**cfg.to_dict(), **without})
    diff = (_eager_logits(cfg, ids) - _eager_logits(plain, ids)).abs().max().item()
    assert diff > 1e-6, f"{without} does not change this model's logits (max diff {diff})"


EAGER_TOL = 1e-5  # eager's fp32 softmax (module docstring): observed up to 6e-8 in logits, 2e-6 in gradients


def test_window_off_by_one_is_visible():
    """One process, group of one: the ring with transformers' window equals eager within the fp32
    softmax error; a window one shorter or longer misses it by orders of magnitude more."""
    from transformers import AutoModelForCausalLM

    from hetsp.attention import make_shard_context, register_attention

    cfg = mistral()
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").double()
    ids = torch.randint(0, cfg.vocab_size, (MAX_LEN,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
        errs = {}
        for w in (WINDOW - 1, WINDOW, WINDOW + 1):
            model = AutoModelForCausalLM.from_config(type(cfg)(**{**cfg.to_dict(), "sliding_window": w}), attn_implementation=register_attention()).double()
            model.load_state_dict(ref.state_dict())
            ctx = make_shard_context([MAX_LEN], 0, 1, 0, "cpu")
            got = model(input_ids=ids[None], position_ids=ctx.positions[None], hetsp_shard=ctx).logits[0]
            errs[w] = (got - want).abs().max().item()
    assert errs[WINDOW] < EAGER_TOL and errs[WINDOW - 1] > 100 * EAGER_TOL and errs[WINDOW + 1] > 100 * EAGER_TOL, errs


@pytest.mark.parametrize("build", [mistral, qwen2], ids=["mistral", "qwen2"])
def test_sliding_window_matches_one_process(rank_pool, build):
    cfg = build()
    if build is mistral:
        _assert_feature_changes_output(cfg, sliding_window=None)
    else:
        _assert_feature_changes_output(cfg, layer_types=["full_attention", "full_attention"])
    assert ring_matches_one_process(rank_pool, cfg, "sdpa", max_len=MAX_LEN) == {1, 2, 3, 4}


@pytest.mark.parametrize("softcap", [50.0, 0.5])
def test_gemma2_softcap_and_window_match_one_process_eager(rank_pool, softcap):
    """Gemma2's default softcap of 50 (barely active on a tiny random model) and 0.5 (strongly
    active), with its alternating sliding-window and full layers."""
    cfg = gemma2(softcap)
    if softcap < 1:
        _assert_feature_changes_output(cfg, attn_logit_softcapping=None)
    _assert_feature_changes_output(cfg, layer_types=["full_attention", "full_attention"])
    assert ring_matches_one_process(rank_pool, cfg, "eager", max_len=MAX_LEN, tol=EAGER_TOL) == {1, 2, 3, 4}
