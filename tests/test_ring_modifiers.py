"""Sliding windows and logit softcapping in ring attention: every kernel that can express them
against fp64 full attention with autograd; the skipped ring steps; refusals."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hetsp.attention.kernels.base import Segments
from hetsp.attention.kernels.reference import REFERENCE_KERNEL
from hetsp.attention.steps import ring_steps
from hetsp.layout import group_layouts

from . import attn_fns
from .test_ring_attention import LAYOUTS, WORLD, assemble, make_case, truth

ROOT = Path(__file__).resolve().parents[1]
# fp64 throughout: the ring only reorders sums (observed ~1e-15); fp32 inputs round at ~1e-7
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def check(case, results):
    for gi, got in assemble(case, results).items():
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, truth(case, gi)):
            torch.testing.assert_close(a.double(), b, **TOL[case["inputs"][gi][0].dtype], msg=lambda m, n=name: f"{n} {case['groups']}: {m}")


@pytest.mark.parametrize("kernel", ["torch_cpu", "reference"])
def test_window_and_softcap_match_full_attention(rank_pool, kernel):
    """Every layout, windows of 1 (self only), 3, 8 and 40 (longer than every sequence), softcap
    alone and with a window, GQA; sequences longer and shorter than the window and the group."""
    lengths = [[37, 1, 9], [2, 30], [23]]
    cases = []
    seed = 0
    for groups in LAYOUTS.values():
        for window, softcap in ((1, None), (3, None), (8, None), (40, None), (None, 0.7), (5, 1.3)):
            seed += 1
            dtype = torch.float64 if seed % 3 else torch.float32
            case = make_case(groups, [lengths[(seed + i) % 3] for i in range(len(groups))], 4, 2, 8, dtype, True, seed, kernel=kernel, scale=0.9)
            case.update(window=window, softcap=softcap)
            cases.append(case)
    per_rank = rank_pool(WORLD).run(attn_fns.ring_cases, cases)
    for i, case in enumerate(cases):
        check(case, [per_rank[r][i] for r in range(WORLD)])


def _block_calls(lengths, d, window):
    return sum(not st.empty for r in range(d) for st in ring_steps(group_layouts(lengths, d), r, True, window))


def test_window_skips_blocks_outside_every_window():
    """One 64-token sequence on 4 ranks (chunks of 8): a window of 4 leaves each rank only the
    blocks that hold its chunks' neighbours; a window as long as the sequence skips nothing."""
    full = _block_calls([64], 4, None)
    assert full == 16
    assert _block_calls([64], 4, 64) == full
    # chunk c sees chunks c and c-1 only; rank r holds chunks r and 7-r, so it needs the blocks
    # of the ranks holding chunks r-1 and 6-r besides its own
    assert _block_calls([64], 4, 4) == 4 + 3 + 3
    for r in range(4):
        steps = ring_steps(group_layouts([64], 4), r, True, 4)
        for st in steps:
            if not st.empty:  # every kept query row sees a key of the block, every kept key is seen
                qp, kp = torch.tensor(st.seg.q_pos), torch.tensor(st.seg.k_pos)
                diff = qp[:, None] - kp[None, :]
                vis = (diff >= 0) & (diff < 4)
                assert bool(vis.any(1).all()) and bool(vis.any(0).all())


def test_torch_cpu_window_rows_without_keys_get_no_weight():
    """Direct kernel call with positions that hide every key from some rows (the CPU op would
    give them lse = 0): lse is -inf there and out 0, like the reference kernel."""
    from hetsp.attention.kernels.torch_cpu import TORCH_CPU_KERNEL

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, 4, generator=g, dtype=torch.float64) for n in (6, 4, 4))
    seg = Segments((0, 3, 6), (0, 2, 4), q_pos=(10, 11, 30, 5, 6, 7), k_pos=(8, 9, 4, 5))
    o, l = TORCH_CPU_KERNEL.forward(q, k, v, seg, False, 0.5, window=3)
    o_ref, l_ref = REFERENCE_KERNEL.forward(q, k, v, seg, False, 0.5, window=3)
    assert torch.isinf(l[2]).all() and torch.isinf(l_ref[2]).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)  # fp64 kernels, same sums
    torch.testing.assert_close(l, l_ref, rtol=1e-12, atol=1e-12)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    l_final = torch.where(torch.isinf(l_ref), torch.zeros_like(l_ref), l_ref)  # a ring's final lse is finite
    for a, b in zip(TORCH_CPU_KERNEL.backward(do, q, k, v, o_ref, l_final, seg, False, 0.5, window=3),
                    REFERENCE_KERNEL.backward(do, q, k, v, o_ref, l_final, seg, False, 0.5, window=3)):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-12, atol=1e-12)


def test_refusals():
    from hetsp.attention import make_shard_context, ring_attention
    from hetsp.attention.kernels import flash

    ctx = make_shard_context([5], 0, 1, 0, "cpu")
    q = torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match="causal attention only"):
        ring_attention(q, q, q, ctx, causal=False, window=3)
    with pytest.raises(ValueError, match="int >= 1"):
        ring_attention(q, q, q, ctx, window=0)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        ring_attention(q, q, q, ctx, softcap=-1.0)
    # a kernel without a modifier is refused before any exchange, naming the kernels that have it
    from dataclasses import replace

    plain = replace(ctx, kernel=replace(ctx.kernel, score_modifiers=frozenset({"softcap"})))
    with pytest.raises(NotImplementedError, match="does not implement window.*kernel='reference', 'torch_cpu', 'triton'"):
        ring_attention(q, q, q, plain, window=3)
    ring_attention(q, q, q, plain, softcap=2.0)
    with pytest.raises(NotImplementedError, match="'flash_attn' cannot express.*kernel='triton'"):
        flash.block_forward(q, q, q, Segments((0, 5), (0, 5), q_pos=tuple(range(5)), k_pos=tuple(range(5))), True, 0.5, window=3)


def test_triton_window_and_softcap_in_interpreter():
    """Triton fwd+bwd with window and softcap vs the reference kernel; TRITON_INTERPRET must be
    set before triton is imported, so in a subprocess."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from tests import modifier_fns; print(modifier_fns.triton_modifier_checks())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize("window", [1, 3, 130, 400])
def test_torch_cpu_window_tiles_match_reference(window):
    """Segments longer than the CPU kernel's query tile (128 rows), with a gap in positions (a
    zigzag diagonal block): tiles see exactly the keys of their windows."""
    from hetsp.attention.kernels.torch_cpu import TORCH_CPU_KERNEL

    g = torch.Generator().manual_seed(window)
    pos = tuple(range(0, 170)) + tuple(range(400, 560)) + tuple(range(7, 12))
    seg = Segments((0, 330, 335), (0, 330, 335), q_pos=pos, k_pos=pos)
    q = torch.randn(335, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(335, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    o, l = TORCH_CPU_KERNEL.forward(q, k, v, seg, True, 0.4, window=window)
    o_ref, l_ref = REFERENCE_KERNEL.forward(q, k, v, seg, True, 0.4, window=window)
    # fp64 kernels: the same sums in another order
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l, l_ref, rtol=1e-12, atol=1e-12)
    got = TORCH_CPU_KERNEL.backward(do, q, k, v, o_ref, l_ref, seg, True, 0.4, window=window)
    want = REFERENCE_KERNEL.backward(do, q, k, v, o_ref, l_ref, seg, True, 0.4, window=window)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-12, atol=1e-12)
