"""Online sampling: every rank stays in ZeRO-3's parameter gathers until all have finished;
sampling equals the same sampling in one process; reward functions are checked."""

import pytest
import torch

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
