"""Sequence-parallel SSM layers against one process (gloo, CPU).

Groups of 2, 3 and 4 ranks under the zigzag layout, two groups at once in a
world of 4, documents of length 1 and shorter than the group, ranks without
tokens. Ops (output and every gradient): fp64 rtol 1e-9 / atol 1e-10, fp32
rtol 2e-4 / atol 2e-5 (ssm_fns.TOL). HybridForCausalLM (loss and every
parameter gradient, reference: the whole packed batch with cu_seqlens in one
process): fp64 rtol 1e-7 / atol 1e-9, fp32 rtol 1e-4 / atol 1e-5 (MODEL_TOL).
"""

import pytest
import torch

from hetsp.layout import shard_layout
from hetsp.ssm_parallel import halo_routes, local_segments

from . import ssm_fns

F64, F32 = torch.float64, torch.float32

# (groups, lengths per group) per world size: odd sizes, lengths 1 and < group size,
# ranks holding no token at all ([2, 1] on 3 ranks, [1, 2] on 4), two groups at once.
LAYOUTS = {
    2: [([(0, 2)], [[7, 1, 3]]), ([(0, 2)], [[300, 5]])],  # chunks longer than the 64-token blocks
    3: [([(0, 3)], [[1, 2, 11, 5]]), ([(0, 3)], [[2, 1]])],
    4: [([(0, 4)], [[9, 1, 3]]), ([(0, 4)], [[1, 2]]), ([(0, 2), (2, 2)], [[6, 1], [2, 10]]), ([(0, 1), (1, 3)], [[4, 3], [13, 2]])],
}


# Ops: hetsp's own (conv, ssd with any local scan, complex diagonal state passing), the Bamba
# kernel under ssd_scan_sp, and the group versions of every `models.kernels` kernel (hy_*).
OPS = [("conv", F64), ("ssd", F64), ("diag", F64), ("conv", F32), ("ssd_bamba", F32)] + [
    (op, F64) for op in ("hy_s4d", "hy_ema", "hy_ssd", "hy_conv", "hy_attn")
]


def _check_params(results_per_rank, num_cases, dtype_of):
    for c in range(num_cases):
        by_group = {}
        for res in results_per_rank:
            start, params = res[c]
            by_group.setdefault(start, []).append(params)
        for start, members in by_group.items():
            for name in members[0]:
                total = sum(m[name][0] for m in members)
                ref = members[0][name][1]
                torch.testing.assert_close(total, ref, **ssm_fns.TOL[dtype_of(c)], msg=lambda m: f"case {c} group {start} grad {name}: {m}")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ops_match_single_process(rank_pool, world):
    cases = []
    seed = 10 * world
    for groups, lengths in LAYOUTS[world]:
        for op, dtype in OPS:
            cases.append((op, groups, lengths, dtype, seed))
            seed += 1
    results = rank_pool(world).run(ssm_fns.op_cases, cases)
    _check_params(results, len(cases), lambda c: cases[c][3])


def test_halo_routes_cover_every_previous_token():
    lengths = (1, 2, 3, 9, 17)
    for d in (1, 2, 3, 4):
        for width in (0, 1, 3, 5):
            sent = {}
            for r in range(d):
                routes = halo_routes(lengths, d, r, width)
                seg = local_segments(lengths, d, r)
                filled = sorted(row for rows in routes.recv.values() for row, _ in rows)
                expected = [
                    k * width + j
                    for k in range(seg.num_segments)
                    if seg.length[k]
                    for j in range(width)
                    if seg.start[k] - width + j >= 0
                ]
                assert filled == expected
                for dst, idx in routes.send.items():
                    sent[(r, dst)] = len(idx)
            for r in range(d):
                for src, rows in halo_routes(lengths, d, r, width).recv.items():
                    if src != r:
                        assert sent[(src, r)] == len(rows)


def _has_empty_rank(groups, lengths_per_group):
    return any(
        shard_layout(lengths, size, r).num_tokens == 0
        for (_, size), lengths in zip(groups, lengths_per_group)
        for r in range(size)
    )


def _hybrid(pattern):
    return dict(
        hidden_size=32, num_layers=len(pattern.split(",")), num_heads=4, num_kv_heads=2, intermediate_size=48,
        extra=dict(layer_pattern=pattern, s4d_state_size=8, ema_dim=4, mamba_d_state=8, mamba_head_dim=16,
                   mamba_chunk_size=4, seqboat_window=3, seqboat_z_dim=8, seqboat_v_dim=16),
    )


ALL_FIVE = _hybrid("attention,s4d,ema,mamba2,seqboat")
SSM_ONLY = _hybrid("s4d,ema,mamba2,seqboat")
# fp64 tight for the SSM kinds; fp32 for all five kinds (the single-process eager attention
# itself takes its softmax in fp32, so fp64 would not be tighter there).
MODEL_TOL = {F64: dict(rtol=1e-7, atol=1e-9), F32: dict(rtol=1e-4, atol=1e-5)}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_hybrid_model_matches_single_process(rank_pool, world):
    """Loss and every gradient of a HybridForCausalLM against the whole packed batch in one process."""
    cases = []
    for i, (groups, lengths) in enumerate(LAYOUTS[world]):
        cases.append(("hybrid", SSM_ONLY, groups, lengths, 7 * world + i, "cu_seqlens", F64))
        if not _has_empty_rank(groups, lengths):  # attention layers cannot take a 0-token input
            cases.append(("hybrid", ALL_FIVE, groups, lengths, 7 * world + i, "cu_seqlens", F32))
    results = rank_pool(world).run(ssm_fns.model_cases, cases)
    for dtype in (F64, F32):
        picked = [c for c, case in enumerate(cases) if case[-1] == dtype]
        ssm_fns.check_model_results(
            [[res[c] for c in picked] for res in results], [cases[c] for c in picked], MODEL_TOL[dtype]
        )


def test_seqboat_window_longer_than_every_chunk(rank_pool):
    """A SeqBoat window longer than any chunk: the gathered tails shrink to the longest chunk of the
    group, and loss and gradients still match one process (fp64)."""
    wide = dict(SSM_ONLY, extra=dict(SSM_ONLY["extra"], seqboat_window=64))
    cases = [("hybrid", wide, groups, lengths, 91 + i, "cu_seqlens", F64) for i, (groups, lengths) in enumerate(LAYOUTS[4])]
    results = rank_pool(4).run(ssm_fns.model_cases, cases)
    ssm_fns.check_model_results(results, cases, MODEL_TOL[F64])


@pytest.mark.parametrize("kinds, dtype", [("ssm", F64), ("all", F32)])
def test_random_plans_through_the_executor(rank_pool, kinds, dtype):
    """Random plans on 4 ranks (groups of every size, idle ranks, sequences shorter than their group):
    `hetsp.executor.run_plan` gives the single-process loss and gradients (SSM kinds in fp64, all
    five kinds in fp32)."""
    model_kwargs = SSM_ONLY if kinds == "ssm" else ALL_FIVE
    import random

    from hetsp.config import ClusterConfig, PlannerConfig
    from solver import get_planner

    rng = random.Random(5)
    planner = get_planner("random", PlannerConfig(seed=5), ClusterConfig())
    cases = []
    for _ in range(2):
        lengths = [rng.choice([1, 2, 3, rng.randint(4, 20)]) for _ in range(rng.randint(2, 6))]
        lengths[0] = max(lengths[0], 5)
        seqs = [[rng.randrange(ssm_fns.VOCAB) for _ in range(n)] for n in lengths]
        cases.append((seqs, planner.plan(lengths, 4).to_json()))
    results = rank_pool(4).run(ssm_fns.plan_steps, cases, model_kwargs, dtype)
    for c, (seqs, plan_json) in enumerate(cases):
        ref_loss, ref_grads = ssm_fns.plan_reference(seqs, model_kwargs, dtype)
        num_units = results[0][c][1]
        loss = sum(r[c][0] for r in results) / num_units
        assert loss == pytest.approx(ref_loss, rel=MODEL_TOL[dtype]["rtol"]), plan_json
        for name, ref in ref_grads.items():
            total = sum(r[c][2][name] for r in results) / len(results)  # run_plan scales by world / num_units
            torch.testing.assert_close(total, ref, **MODEL_TOL[dtype], msg=lambda m: f"{name} {plan_json}: {m}")


def _tiny(family, **extra):
    from hetsp.config import ModelConfig
    from hetsp.model_registry import build_model

    cfg = dict(SSM_ONLY, extra=dict(SSM_ONLY["extra"], **extra)) if family == "hybrid" else dict(
        hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48
    )
    return build_model(ModelConfig(family=family, **cfg), 61)


def test_parallelize_is_idempotent_and_a_no_op_without_ssm_layers():
    from hetsp.ssm_parallel import parallelize

    llama = _tiny("llama")
    before = {n: p.clone() for n, p in llama.state_dict().items()}
    assert parallelize(llama) is llama
    assert all(not m._forward_pre_hooks for m in llama.modules())
    assert all(torch.equal(before[n], p) for n, p in llama.state_dict().items())

    model = _tiny("hybrid")
    parallelize(model)
    mixers = [layer.mixer for layer in model.model.layers]
    kernels = [dict(m.kernels.maps[0]) for m in mixers]
    hooks = [len(m._forward_pre_hooks) for m in mixers]
    parallelize(model)
    assert [dict(m.kernels.maps[0]) for m in mixers] == kernels
    assert [len(m._forward_pre_hooks) for m in mixers] == hooks == [1, 1, 1, 1]


def test_kernels_replaced_after_parallelize_is_an_error(rank_pool):
    results = rank_pool(2).run(ssm_fns.replaced_kernel_error, SSM_ONLY)
    assert all("call set_kernels before parallelize" in r for r in results)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_lti_state_response_matches_powers(block):
    from hetsp.ssm_parallel.lti import lti_state_response

    g = torch.Generator().manual_seed(0)
    segments = local_segments((11, 1, 40), 2, 1)
    H, N = 3, 4
    A = torch.exp(torch.complex(-torch.rand(H, N, generator=g, dtype=F64), torch.randn(H, N, generator=g, dtype=F64)) * 0.3)
    C = torch.complex(torch.randn(H, N, generator=g, dtype=F64), torch.randn(H, N, generator=g, dtype=F64))
    s_in = torch.complex(torch.randn(segments.num_segments, H, N, generator=g, dtype=F64), torch.zeros(segments.num_segments, H, N, dtype=F64))
    expected = torch.cat([
        torch.stack([(C * A ** (j + 1) * s_in[k]).sum(-1) for j in range(n)]) if n else torch.zeros(0, H, dtype=A.dtype)
        for k, n in enumerate(segments.length)
    ])
    torch.testing.assert_close(lti_state_response(A, C, s_in, segments, block=block), expected, rtol=1e-12, atol=1e-12)
