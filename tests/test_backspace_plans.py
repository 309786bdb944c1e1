"""Whole plans through the executor on `<bkspc>` sequences: groups of 1 to 4 and mixed plans, the hybrid
model with all five mixer kinds and a stock Llama, loss and every gradient against the per-context
reference (one process, fp64). Tolerance rel 1e-9 / abs 1e-12: fp64 rounding of different summation orders."""

from __future__ import annotations

import random

import pytest

from hetsp.backspace import stack_structure
from hetsp.plan import Group, MicroBatch, Plan

from . import backspace_fns
from .backspace_fns import BK, deep_pop_ids, random_backspace_ids
from .test_ssm_parallel import ALL_FIVE

LLAMA = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)
TOL = dict(rtol=1e-9, atol=1e-12)


def _batch(seed):
    rng = random.Random(seed)
    seqs, structures = [], []
    for n, kind in ((24, "deep"), (17, "random"), (3, "plain"), (9, "random")):
        if kind == "deep":
            ids, prompt = deep_pop_ids(n), n // 4
        elif kind == "random":
            ids, prompt = random_backspace_ids(rng, n, prompt=2, p_pop=0.35), 2
        else:
            ids, prompt = [rng.randrange(8) for _ in range(n)], 0
        seqs.append(ids)
        structures.append(stack_structure(ids, BK, vocab_size=61, prompt_length=prompt))
    return seqs, structures


def _plans(lengths):
    g = lambda start, size, *seqs: Group(start, size, tuple(seqs))  # noqa: E731
    return [
        Plan(lengths, (MicroBatch((g(0, 4, 0, 1, 2, 3),)),)),  # one group of 4
        Plan(lengths, (MicroBatch((g(0, 1, 1), g(1, 3, 3))), MicroBatch((g(0, 2, 2, 0), g(2, 2))))),  # mixed, an idle group
        Plan(lengths, (MicroBatch((g(0, 3, 0, 2), g(3, 1, 1, 3))),)),
    ]


@pytest.mark.parametrize("family,model_kwargs", [("hybrid", ALL_FIVE), ("llama", LLAMA)], ids=["hybrid-all-five", "llama"])
def test_plans_match_per_context_reference(rank_pool, family, model_kwargs):
    seqs, structures = _batch(4)
    lengths = [len(s) for s in seqs]
    plans = _plans(lengths)
    cases = [(seqs, structures, p.to_json()) for p in plans]
    results = rank_pool(4).run(backspace_fns.plan_steps, cases, family, model_kwargs, "torch_cpu")
    ref_loss, ref_grads = backspace_fns.per_context_reference(seqs, structures, family, model_kwargs)
    backspace_fns.assert_plans_match(results, len(plans), ref_loss, ref_grads, TOL)
