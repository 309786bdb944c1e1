"""A stock LlamaForCausalLM under ring attention equals the same model in one process."""

import pytest
import torch

from hetsp.layout import group_layouts

from . import attn_fns

WORLD = 4


def tiny_config(kv_heads=2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        attention_dropout=0.0,
    )


def reference(model, lengths, ids, weights):
    """Each sequence alone through the stock model (sdpa): (packed logits, {name: grad})."""
    model.zero_grad()
    logits, start = [], 0
    for s in lengths:
        out = model(input_ids=ids[None, start : start + s]).logits[0]
        logits.append(out)
        start += s
    logits = torch.cat(logits)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def ring_matches_one_process(rank_pool, cfg, attn_implementation="sdpa", group_sets=None, max_len=23, seed=0, tol=1e-9):
    """A stock model under ring attention on the world's groups equals the same model run in
    one process (`attn_implementation`) on each sequence alone: logits and every gradient in
    fp64. Returns the group sizes checked."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation).double()
    state = model.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    runs = []
    for groups in group_sets or ([(0, 2), (2, 2)], [(0, 3), (3, 1)], [(0, 4)]):
        lengths = [[1 + int(x) for x in torch.randint(1, max_len, (3,), generator=g)] + [1] for _ in groups]
        ids = [torch.randint(0, cfg.vocab_size, (sum(l),), generator=g) for l in lengths]
        weights = [torch.randn(sum(l), cfg.vocab_size, generator=g, dtype=torch.float64) for l in lengths]
        runs.append(([(s, d, tuple(l)) for (s, d), l in zip(groups, lengths)], ids, weights))
    per_rank = rank_pool(WORLD).run(attn_fns.llama_ring_grads_many, cfg, state, runs)
    checked = set()
    for ri, (groups, ids, weights) in enumerate(runs):
        for gi, (start, size, lengths) in enumerate(groups):
            want_logits, want_grads = reference(model, lengths, ids[gi], weights[gi])
            logits = torch.full_like(want_logits, float("nan"))
            grads = {n: torch.zeros_like(t) for n, t in want_grads.items()}
            for lay in group_layouts(lengths, size):
                got_gi, part, part_grads = per_rank[start + lay.rank][ri]
                assert got_gi == gi
                logits[torch.tensor(lay.token_index, dtype=torch.long)] = part
                for n in grads:
                    grads[n] += part_grads[n]
            # fp64 throughout; the ring only reorders sums (observed differences ~1e-15); `tol` is
            # looser where the reference itself rounds (eager attention takes softmax in fp32)
            torch.testing.assert_close(logits, want_logits, rtol=tol, atol=tol)
            for n in grads:
                torch.testing.assert_close(grads[n], want_grads[n], rtol=tol, atol=tol, msg=lambda m, n=n: f"{n}: {m}")
            checked.add(size)
    return checked


@pytest.mark.parametrize("kv_heads", [2])
def test_llama_logits_and_grads_match_one_process(rank_pool, kv_heads):
    assert ring_matches_one_process(rank_pool, tiny_config(kv_heads)) == {1, 2, 3, 4}


def test_missing_shard_context_is_explained():
    from transformers import AutoModelForCausalLM

    from hetsp.attention import register_attention

    name = register_attention()
    assert register_attention() == name == "hetsp_ring"
    model = AutoModelForCausalLM.from_config(tiny_config(), attn_implementation=name)
    with pytest.raises(ValueError, match="hetsp_shard=ctx"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
