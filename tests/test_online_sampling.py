"""Online sampling and Diverse Beam Search: every rank stays in ZeRO-3's parameter gathers until
all have finished; sampling equals the same sampling in one process, each prompt's beams equal
`diverse_beam_search` of it in one process whichever rank decodes it; reward functions are
checked."""

import pytest
import torch

from hetsp.generation.diverse_beam import diverse_beam_search
from hetsp.generation.sampling import load_reward_fn, sample_in_lockstep, score_completions

from . import copg_fns, generation_fns, step_fns


def test_zero3_sampling_with_uneven_work_finishes_and_matches_one_process(rank_pool):
    # rank 0 has three prompts of different lengths, rank 1 one, rank 2 none: without lockstep
    # the ranks would leave the parameter gathers at different times and hang
    prompts = [[[1, 2, 3], [4], [5, 6, 7, 8, 9]], [[10, 11]], []]
    outs = rank_pool(3).run(copg_fns.lockstep_sampling, prompts, 2, 6, 3)
    from hetsp.attention import register_attention

    model = step_fns.tiny_model(register_attention(), torch.float32).eval()
    for rank, got in enumerate(outs):
        gen = torch.Generator().manual_seed(100 + rank)
        want = sample_in_lockstep(model, prompts[rank], 2, 6, gen, 0, "cpu", 0.9, 0.9, 3, "reference")
        assert got == want
        for comps in got:
            assert all(1 <= len(c) <= 6 and (len(c) == 6 or c[-1] == 3) for c in comps)


def test_zero3_cached_sampling_of_the_hybrid_model_matches_one_process(rank_pool):
    # every mixer kind's cache under ZeRO-3 gathers, uneven work (rank 1 idle from the start)
    prompts = [[[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], []]
    outs = rank_pool(2).run(generation_fns.hybrid_zero3_sampling, prompts, 2, 5)
    model = generation_fns.hybrid_model()
    for rank, got in enumerate(outs):
        want = sample_in_lockstep(model, prompts[rank], 2, 5, torch.Generator().manual_seed(100 + rank), 0, "cpu",
                                  0.9, 0.9, 3, "reference")
        assert got == want


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]


def _one_process_beams(model, prompt, *args):
    return [[(b.tokens, b.score, b.finished) for b in g] for g in diverse_beam_search(model, prompt, *args, "cpu", "reference")]


def _check_spreads(outs, spreads, want):
    """Every rank's beams of every spread equal the one-process beams of the same prompt: the same
    tokens and finished flags, and the same scores up to fp32 rounding (the same forwards on the same
    gathered weights, one intra-op thread in both, as the pool's ranks run; another process's
    buffers may still round differently, so scores are compared with rel 1e-5)."""
    for s, spread in enumerate(spreads):
        for rank, prompts in enumerate(spread):
            assert len(outs[rank][s]) == len(prompts)
            for p, got in zip(prompts, outs[rank][s]):
                ref = want[PROMPTS.index(p)]
                assert [[(t, f) for t, _, f in g] for g in got] == [[(t, f) for t, _, f in g] for g in ref]
                for g, r in zip(got, ref):
                    assert [b[1] for b in g] == pytest.approx([b[1] for b in r], rel=1e-5, abs=1e-6)


def test_zero3_diverse_beam_search_with_uneven_work_matches_one_process(rank_pool, one_thread):
    # three spreads of the same prompts over 3 ranks, each with a rank that has none: without
    # lockstep the ranks would leave the parameter gathers at different times and hang
    P = PROMPTS
    spreads = [[[P[0], P[1], P[2]], [P[3]], []], [[], [P[2]], [P[3], P[0], P[1]]], [[P[1]], [], [P[0], P[2], P[3]]]]
    args = (4, 2, 0.7, 6, 3)  # 4 beams in 2 groups, diversity 0.7, 6 new tokens, eos 3
    outs = rank_pool(3).run(copg_fns.diverse_beams_in_engine, spreads, *args, 3, timeout=300)
    from hetsp.attention import register_attention

    model = step_fns.tiny_model(register_attention(), torch.float32).eval()
    want = [_one_process_beams(model, p, *args) for p in P]
    assert any(b[2] for groups in want for g in groups for b in g)  # eos ends some beams early
    _check_spreads(outs, spreads, want)


def test_zero3_cached_diverse_beam_search_of_the_hybrid_model_matches_one_process(rank_pool, one_thread):
    # every mixer kind's cache reordered by beam under ZeRO-3 gathers; a rank idle from the start
    P = PROMPTS
    spreads = [[[P[2], P[0]], []], [[P[0]], [P[2]]]]
    args = (3, 3, 0.5, 5, 3)
    outs = rank_pool(2).run(generation_fns.hybrid_zero3_diverse_beams, spreads, *args, timeout=300)
    model = generation_fns.hybrid_model()
    want = {i: _one_process_beams(model, P[i], *args) for i in (0, 2)}
    _check_spreads(outs, spreads, [want.get(i) for i in range(len(P))])


def good_reward(prompt, completion):
    return len(completion) / 10


def raising_reward(prompt, completion):
    raise KeyError("boom")


def nan_reward(prompt, completion):
    return float("nan")


def test_reward_function_errors_name_the_function_and_example():
    spec = f"{__name__}:good_reward"
    assert score_completions(load_reward_fn(spec), spec, "p", ["ab", "abc"], "prompt 0") == [0.2, 0.3]
    for name, msg in [("raising_reward", "raised KeyError"), ("nan_reward", "returned nan")]:
        spec = f"{__name__}:{name}"
        with pytest.raises(ValueError, match=f"{name}.*{msg}.*prompt 4, completion 0"):
            score_completions(load_reward_fn(spec), spec, "p", ["x"], "prompt 4")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_reward_fn(f"{__name__}:missing")
    with pytest.raises(ValueError, match="module:function"):
        load_reward_fn("no_colon")
