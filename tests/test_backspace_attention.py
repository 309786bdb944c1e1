"""Ring attention on `<bkspc>` sequences: query j sees exactly ctx(j), on every group layout and kernel."""

import random

import pytest
import torch

from hetsp.attention import make_shard_context, ring_attention
from hetsp.backspace import pack_structures, stack_structure

from .backspace_fns import BK, deep_pop_ids, random_backspace_ids
from hetsp.testing import tolerance_ratio

from .test_ring_attention import LAYOUTS, WORLD, assemble, make_case

# fp64 on O(1) inputs over at most ~50 keys: rounding is ~1e-15; a zero gradient (a key no query
# sees) has round-off of the same order, hence the absolute term.
TOL = dict(atol=1e-10, rtol=1e-9)


def structures_for(lengths, rng, kind):
    out = []
    for n in lengths:
        prompt = n // 4 if kind == "deep" else min(2, n)
        if kind == "deep":
            ids = deep_pop_ids(n)
        else:
            ids = random_backspace_ids(rng, n, prompt=prompt, p_pop=rng.choice([0.15, 0.4]))
        out.append(stack_structure(ids, BK, vocab_size=10, prompt_length=prompt))
    return out


def context_truth(case, gi):
    """fp64, per position j: softmax over the keys of ctx(j) only; (out, dq, dk, dv) by autograd."""
    structure = case["structures"][gi]
    q, k, v, do = (x.double().clone().requires_grad_(True) for x in case["inputs"][gi])
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = case["scale"] if case["scale"] is not None else q.shape[-1] ** -0.5
    outs = []
    for j in range(q.shape[0]):
        ctx = [j]
        while structure.parents[ctx[-1]] >= 0:
            ctx.append(structure.parents[ctx[-1]])
        idx = torch.tensor(ctx[::-1])
        kk = k[idx].repeat_interleave(heads // kv_heads, 1)  # (n, H, D)
        vv = v[idx].repeat_interleave(heads // kv_heads, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[j], kk) * scale, -1)
        outs.append(torch.einsum("hn,nhd->hd", p, vv))
    out = torch.stack(outs)
    out.backward(do.detach())
    return out.detach(), q.grad, k.grad, v.grad


def run(pool, cases):
    from . import attn_fns

    per_rank = pool.run(attn_fns.ring_cases, cases)
    errs = []
    for i, c in enumerate(cases):
        worst = 0.0
        for gi, got in assemble(c, [per_rank[r][i] for r in range(WORLD)]).items():
            for a, b in zip(got, context_truth(c, gi)):
                worst = max(worst, tolerance_ratio(a, b, **TOL))
        errs.append(worst)
    return errs


@pytest.mark.parametrize("kernel", ["torch_cpu", "reference"])
def test_ring_attention_backspace_all_layouts(rank_pool, kernel):
    """Random structures (isolated pops, runs of pops) and a deep run popping across several shards,
    on every group layout, GQA, fp64: within TOL of the per-context truth (fp64 rounding only)."""
    rng = random.Random(1)
    cases = []
    seed = 0
    for name, groups in LAYOUTS.items():
        for kind in ("random", "deep"):
            seed += 1
            lengths = [[rng.randint(9, 24), rng.randint(1, 5), 16] for _ in groups]
            structures = [pack_structures(structures_for(ls, rng, kind)) for ls in lengths]
            case = make_case(groups, lengths, 4, 2, 8, torch.float64, True, seed, kernel=kernel, scale=0.4 if seed % 2 else None)
            case["structures"] = structures
            cases.append(case)
    errs = run(rank_pool(WORLD), cases)
    assert max(errs) <= 1, errs


def test_plain_structure_takes_todays_path():
    """A structure without <bkspc> gives a context identical to one built without it."""
    s = pack_structures([stack_structure([1, 2, 3], BK, 10), stack_structure([4, 5], BK, 10)])
    a = make_shard_context([3, 2], 0, 1, 0, "cpu", structure=s)
    b = make_shard_context([3, 2], 0, 1, 0, "cpu")
    assert a.tree is None and a.positions.tolist() == b.positions.tolist()


def test_positions_are_depths():
    s = stack_structure([1, 2, 3, BK, BK, 4], BK, 10, prompt_length=1)
    ctx = make_shard_context([6], 0, 1, 0, "cpu", structure=s)
    assert ctx.positions.tolist() == [0, 1, 2, 2, 1, 1]


def test_kernel_without_mask_is_refused(monkeypatch):
    """A kernel that cannot express the ancestor mask (flash-attn) is refused when the context is built."""
    from dataclasses import replace

    import hetsp.attention.context as context
    from hetsp.attention.kernels.torch_cpu import TORCH_CPU_KERNEL

    no_mask = replace(TORCH_CPU_KERNEL, name="flash_attn", lifetime_mask=False)
    monkeypatch.setattr(context, "select_kernel", lambda name, device: no_mask)
    s = stack_structure([1, 2, BK], BK, 10, prompt_length=1)
    with pytest.raises(ValueError, match="cannot express the ancestor mask"):
        make_shard_context([3], 0, 1, 0, "cpu", structure=s)
    make_shard_context([3], 0, 1, 0, "cpu", structure=stack_structure([1, 2, 3], BK, 10))  # plain: fine


def test_non_causal_is_refused():
    s = stack_structure([1, 2, BK], BK, 10, prompt_length=1)
    ctx = make_shard_context([3], 0, 1, 0, "cpu", structure=s)
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="causal=True"):
        ring_attention(x, x, x, ctx, causal=False)


def test_flash_attn_kernel_declares_no_mask():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn not installed: its kernel module cannot be imported here")
    from hetsp.attention.kernels.flash import FLASH_ATTN_KERNEL

    assert not FLASH_ATTN_KERNEL.lifetime_mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_cpu_kernel_lifetime_mask(dtype):
    """The CPU flash op with the additive lifetime mask against the reference kernel; rows that see no
    key get lse = -inf (the op itself gives 0). Elementwise |a - b| <= atol + rtol |b| on O(1) inputs:
    fp64 atol 1e-12, rtol 1e-10 (rounding; atol also covers the exact zeros of rows that see no key);
    fp32 atol = rtol = 1e-5 (fp32 rounding)."""
    from .backspace_fns import lifetime_kernel_vs_reference

    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    bad = [(lab, e) for lab, e in lifetime_kernel_vs_reference("torch_cpu", "cpu", dtype, tol) if not e <= 1]
    assert not bad, bad


def test_triton_lifetime_mask_in_interpreter():
    """Triton fwd+bwd with the lifetime mask vs reference on CPU (TRITON_INTERPRET=1 in a subprocess,
    set before triton is imported); fp32 tolerance 1e-5."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from tests import backspace_fns; print(backspace_fns.triton_lifetime_checks())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")


def test_plain_sequences_call_kernels_as_today():
    """Without a <bkspc>, block kernels are called exactly as before (no `visible` keyword)."""
    from dataclasses import replace

    from hetsp.attention.kernels.torch_cpu import TORCH_CPU_KERNEL

    calls = []

    def fwd(*args, **kwargs):
        calls.append(kwargs)
        return TORCH_CPU_KERNEL.forward(*args, **kwargs)

    def bwd(*args, **kwargs):
        calls.append(kwargs)
        return TORCH_CPU_KERNEL.backward(*args, **kwargs)

    spy = replace(TORCH_CPU_KERNEL, forward=fwd, backward=bwd)
    s = pack_structures([stack_structure([1, 2, 3], BK, 10), stack_structure([4, 5], BK, 10)])
    ctx = make_shard_context([3, 2], 0, 1, 0, "cpu", structure=s)
    ctx.kernel = spy
    q = torch.randn(5, 2, 4, requires_grad=True)
    ring_attention(q, q, q, ctx).sum().backward()
    assert len(calls) == 2 and all(c == {} for c in calls)
