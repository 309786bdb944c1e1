"""Whole plans through the executor on `<bkspc>` sequences: groups of 1 to 4 and mixed plans, the hybrid
model with each mixer kind and with all five, a stock Llama, Bamba and GraniteMoeHybrid; loss and every
gradient against the per-context reference (one process, fp64). The batch holds a run of pops whose
later tokens branch from a parent two or more shards back and pops at chunk boundaries (`deep_pop_ids`),
random isolated pops and runs, and a plain sequence. SSM mixers pass states across shards on the tree
(hetsp/ssm_parallel/tree_state.py). Tolerance rel 1e-9 / abs 1e-12: fp64 rounding of different
summation orders; the transformers Mamba-2 hybrids: rel 1e-5 / abs 1e-7, their stock scan and A are fp32."""

from __future__ import annotations

import random

import pytest

from hetsp.backspace import stack_structure
from hetsp.plan import Group, MicroBatch, Plan

from . import backspace_fns
from .backspace_fns import BK, deep_pop_ids, random_backspace_ids
from .test_hf_clients import TINY as HF_TINY
from .test_ssm_parallel import ALL_FIVE, _hybrid

LLAMA = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)
TOL = dict(rtol=1e-9, atol=1e-12)
HF_TOL = dict(rtol=1e-5, atol=1e-7)
MODELS = [("hybrid", _hybrid(kind), TOL) for kind in ("s4d", "ema", "mamba2", "seqboat")] + [
    ("hybrid", ALL_FIVE, TOL), ("llama", LLAMA, TOL), ("bamba", HF_TINY, HF_TOL), ("granitemoehybrid", HF_TINY, HF_TOL),
]
MODEL_IDS = ["s4d", "ema", "mamba2", "seqboat", "hybrid-all-five", "llama", "bamba", "granitemoehybrid"]


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


@pytest.mark.parametrize("family,model_kwargs,tol", MODELS, ids=MODEL_IDS)
def test_plans_match_per_context_reference(rank_pool, family, model_kwargs, tol):
    seqs, structures = _batch(4)
    lengths = [len(s) for s in seqs]
    plans = _plans(lengths)
    cases = [(seqs, structures, p.to_json()) for p in plans]
    results = rank_pool(4).run(backspace_fns.plan_steps, cases, family, model_kwargs, "torch_cpu")
    ref_loss, ref_grads = backspace_fns.per_context_reference(seqs, structures, family, model_kwargs)
    backspace_fns.assert_plans_match(results, len(plans), ref_loss, ref_grads, tol)


def _random_structures(seed):
    rng = random.Random(seed)
    out = [stack_structure(deep_pop_ids(30), BK, 61, 7)]
    for n in (1, 5, 19, 26):
        prompt = min(2, n)
        out.append(stack_structure(random_backspace_ids(rng, n, prompt, p_pop=rng.choice([0.2, 0.5])), BK, 61, prompt))
    out.append(stack_structure([1, 2, 3, 4, 5, BK, BK, BK, BK, BK, 6, 7], BK, 61, 0))  # pops back to an empty stack
    return out


@pytest.mark.parametrize("group_size", [1, 2, 3, 4])
def test_tree_plan_state_passing_is_exact(group_size):
    """The static plan of state passing, simulated in plain Python for every rank of a group with a scalar
    recurrence h_t = a_t h_parent(t) + b_t: local scans from zero, the exported slots of all ranks, the
    fold and the correction give the sequential tree recurrence; conv taps read the right ancestors.
    Tolerance rel 1e-12: fp64 rounding of products of at most 30 factors."""
    from hetsp.backspace import pack_structures
    from hetsp.layout import group_layouts
    from hetsp.ssm_parallel.segments import local_segments
    from hetsp.ssm_parallel.tree_state import build_conv_plan, build_tree_plan

    structure = pack_structures(_random_structures(group_size))
    lengths = [len(s) for s in _random_structures(group_size)]
    layouts = group_layouts(lengths, group_size)
    rng = random.Random(5)
    n = len(structure)
    a = [rng.uniform(0.5, 1.0) for _ in range(n)]
    b = [rng.uniform(-1.0, 1.0) for _ in range(n)]
    want = []
    for g in range(n):
        p = structure.parents[g]
        want.append(a[g] * (want[p] if p >= 0 else 0.0) + b[g])
    plans = [build_tree_plan(structure, layouts, r) for r in range(group_size)]
    num_segments = local_segments(tuple(lengths), group_size, 0).num_segments
    slots = [(0.0, 0.0)] * (group_size * num_segments * plans[0].num_slots)
    local = []
    for r, (plan, lay) in enumerate(zip(plans, layouts)):
        h, dec = [], []
        for i, g in enumerate(lay.token_index):
            p = plan.local_parents[i]
            h.append(a[g] * (h[p] if p >= 0 else 0.0) + b[g])
            dec.append(a[g] * (dec[p] if p >= 0 else 1.0))
        local.append((h, dec))
        base = r * num_segments * plan.num_slots
        for s, x in enumerate(plan.export_pick):
            if x >= 0:
                i = plan.exported[x]
                slots[base + s] = (dec[i], h[i])
    assert all(p.fold_slot == plans[0].fold_slot and p.fold_anchor == plans[0].fold_anchor for p in plans)
    table = [0.0]
    for s, row in zip(plans[0].fold_slot, plans[0].fold_anchor):
        assert row < len(table), "an exported token's anchor is folded before it"
        table.append(slots[s][1] + slots[s][0] * table[row])
    k = 4
    for r, (plan, lay) in enumerate(zip(plans, layouts)):
        h, dec = local[r]
        got = [h[i] + dec[i] * table[plan.anchor_row[i]] for i in range(lay.num_tokens)]
        torch_want = [want[g] for g in lay.token_index]
        for x, y in zip(got, torch_want):
            assert abs(x - y) <= 1e-12 * abs(y) + 1e-14
    convs = [build_conv_plan(structure, layouts, r, k) for r in range(group_size)]
    # The packed token each row of the gathered conv rows holds (-1: empty slot).
    gathered = [lay.token_index[i] if i >= 0 else -1 for conv, lay in zip(convs, layouts) for i in conv.export_local]
    for conv, lay in zip(convs, layouts):
        rows = list(lay.token_index) + gathered + [-1]  # the table [local rows; gathered rows; zero row]
        for tap, src in enumerate(conv.sources):
            for i, g in enumerate(lay.token_index):
                anc = g
                for _ in range(k - 1 - tap):
                    anc = structure.parents[anc] if anc >= 0 else -1
                assert rows[src[i]] == anc, (lay.rank, tap, i)


def test_group_kernels_on_one_rank_match_tree_kernels():
    """The group versions (tree_kernels.py, seqboat_tree.py) on a group of one rank, which holds two zigzag
    chunks per sequence and so exchanges the anchors' states with itself, against the single-process tree
    kernels on the whole packed rows; fp64, rel 1e-10 / abs 1e-12 (rounding of summation orders)."""
    import torch

    from hetsp.attention import make_shard_context
    from hetsp.backspace import pack_structures
    from hetsp.ssm_parallel import seqboat_tree, tree_kernels
    from hetsp.ssm_parallel.comm import GroupSpec
    from models.kernels.conv import causal_conv1d
    from models.kernels.local_attention import local_attention
    from models.kernels.tree import StackTree, tree_lti_scan, tree_ssd_scan

    structures = _random_structures(0)
    structure = pack_structures(structures)
    n = len(structure)
    shard = make_shard_context([len(s) for s in structures], 0, 1, 0, "cpu", kernel="reference", structure=structure)
    group = GroupSpec.of(shard)
    idx = torch.tensor(shard.layout.token_index)
    full = StackTree(torch.tensor(structure.parents)[None])
    g = torch.Generator().manual_seed(0)
    f64 = dict(generator=g, dtype=torch.float64)
    tol = dict(rtol=1e-10, atol=1e-12)
    A = torch.complex(torch.rand(3, 4, **f64) * 0.9, torch.randn(3, 4, **f64) * 0.3)
    B, C = torch.randn(3, 4, generator=g, dtype=torch.complex128), torch.randn(3, 4, generator=g, dtype=torch.complex128)
    u = torch.randn(n, 3, **f64)
    torch.testing.assert_close(tree_kernels.lti_scan_tree(u[idx], A, B, C, shard, group), tree_lti_scan(u, A, B, C, full, [n - 1])[0][idx], **tol)
    x, dt, a = torch.randn(n, 2, 3, **f64), torch.rand(n, 2, **f64), -torch.rand(2, **f64)
    Bs, Cs = torch.randn(n, 1, 5, **f64), torch.randn(n, 1, 5, **f64)
    want = tree_ssd_scan(dt * a, dt[..., None] * x, Bs.expand(n, 2, 5), Cs.expand(n, 2, 5), full, [n - 1])[0]
    torch.testing.assert_close(tree_kernels.ssd_scan_tree(x[idx], dt[idx], a, Bs[idx], Cs[idx], shard, group), want[idx], **tol)
    xc, w, b = torch.randn(1, n, 6, **f64), torch.randn(6, 4, **f64), torch.randn(6, **f64)
    torch.testing.assert_close(tree_kernels.conv_tree(xc[0, idx], w, b, shard, group), causal_conv1d(xc, w, b, tree=full)[0, idx], **tol)
    q, k, v = torch.randn(n, 4, **f64), torch.randn(n, 4, **f64), torch.randn(n, 5, **f64)
    active = torch.rand(n, generator=g) < 0.6
    for window in (1, 3):
        act = active.nonzero()[:, 0]
        want = torch.zeros(n, 5, dtype=torch.float64)
        want[act] = local_attention(q[act][None], k[act][None], v[act][None], None, window, 0.5, tree=full, tree_index=act[None])[0]
        mine = active[idx].nonzero()[:, 0]  # local slots of the activated tokens
        rows = idx[mine]
        got = seqboat_tree.local_attention_tree(local_attention, q[rows][None], k[rows][None], v[rows][None], window, 0.5, mine[None], shard, group)
        torch.testing.assert_close(got[0], want[rows], **tol)
