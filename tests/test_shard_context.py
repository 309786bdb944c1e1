"""A group where some rank would hold no token is refused on every rank, before any exchange."""

from . import shard_fns
from .test_llama_ring import tiny_config


def test_empty_rank_is_refused_on_every_rank_of_a_3_rank_group(rank_pool):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config()
    state = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").double().state_dict()
    # 2 tokens over 3 ranks: the zigzag split leaves rank 1 without a token
    results = rank_pool(3).run(shard_fns.empty_rank_error, cfg, state, [2])
    for msg, _ in results:
        assert msg is not None and "would hold no token" in msg and "filler document" in msg, results
    # 5 tokens over 3 ranks: every rank holds one, the model runs (no refusal)
    assert [msg for msg, _ in rank_pool(3).run(shard_fns.empty_rank_error, cfg, state, [5])] == [None] * 3

