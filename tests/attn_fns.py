"""Functions the ring attention tests send to ranks (importable by reference).

Inputs are drawn in the test process and passed in whole; each rank slices its shard with
the layout the runtime uses and returns its shard's results for the test to reassemble.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _my_group(groups):
    rank = dist.get_rank()
    for gi, (start, size, lengths) in enumerate(groups):
        if start <= rank < start + size:
            return gi, start, size, lengths
    return None


def ring_cases(cases):
    """For each case run ring attention fwd+bwd on this rank's group.

    case: dict(groups=[(start, size, lengths)], inputs=[(q, k, v, dout) per group, full packed],
               causal, scale, kernel). Returns per case (group index, out, dq, dk, dv) of this
    rank's shard, or None if the rank is in no group.
    """
    from hetsp.attention import make_shard_context, ring_attention

    results = []
    for case in cases:
        mine = _my_group(case["groups"])
        if mine is None:
            results.append(None)
            continue
        gi, start, size, lengths = mine
        structure = case["structures"][gi] if case.get("structures") else None
        ctx = make_shard_context(lengths, start, size, dist.get_rank(), "cpu", kernel=case.get("kernel", "auto"),
                                 structure=structure, allow_empty_ranks=True)
        idx = torch.tensor(ctx.layout.token_index, dtype=torch.long)
        q, k, v, dout = (x.index_select(0, idx) for x in case["inputs"][gi])
        q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
        out = ring_attention(q, k, v, ctx, causal=case["causal"], softmax_scale=case.get("scale"), window=case.get("window"), softcap=case.get("softcap"))
        out.backward(dout)
        results.append((gi, out.detach(), q.grad, k.grad, v.grad))
    return results


def ring_bad_input(lengths, start, size):
    """Call ring attention wrongly in several ways; return the ValueError messages (rank-local checks only)."""
    from hetsp.attention import make_shard_context, ring_attention

    msgs = []
    rank = dist.get_rank()
    ctx = make_shard_context(lengths, start, size, rank, "cpu", allow_empty_ranks=True) if start <= rank < start + size else None
    n = ctx.layout.num_tokens if ctx else 0

    def attempt(fn):
        try:
            fn()
            msgs.append(None)
        except ValueError as e:
            msgs.append(str(e))

    q = torch.randn(n, 4, 8)
    kv = torch.randn(n, 2, 8)
    if ctx is not None:
        attempt(lambda: ring_attention(torch.randn(n + 1, 4, 8), kv, kv, ctx))
        attempt(lambda: ring_attention(q, kv.double(), kv.double(), ctx))
        attempt(lambda: ring_attention(torch.randn(n, 3, 8), kv, kv, ctx))
        attempt(lambda: ring_attention(q, torch.randn(n, 2, 4), torch.randn(n, 2, 4), ctx))
    attempt(lambda: make_shard_context(lengths, 2, dist.get_world_size(), 2, "cpu"))
    attempt(lambda: make_shard_context(lengths, 0, 2, 5 + rank, "cpu"))
    return msgs


def llama_ring_grads_many(cfg, state_dict, runs):
    """`llama_ring_grads` for several (groups, ids_per_group, weights_per_group) runs in one call."""
    return [llama_ring_grads(cfg, state_dict, *run) for run in runs]


def llama_ring_grads(cfg, state_dict, groups, ids_per_group, weights_per_group, kernel="auto"):
    """Run a tiny LlamaForCausalLM under ring attention on this rank's group.

    Loss = sum over local tokens of (logits * weights[token]). Returns (group index,
    local logits, {param name: grad}) or None when the rank is in no group.
    """
    from transformers import AutoModelForCausalLM

    from hetsp.attention import make_shard_context, register_attention

    mine = _my_group(groups)
    if mine is None:
        return None
    gi, start, size, lengths = mine
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register_attention()).double()
    model.load_state_dict(state_dict)
    ctx = make_shard_context(lengths, start, size, dist.get_rank(), "cpu", kernel=kernel)
    idx = torch.tensor(ctx.layout.token_index, dtype=torch.long)
    ids = ids_per_group[gi].index_select(0, idx)
    logits = model(input_ids=ids[None], position_ids=ctx.positions[None], hetsp_shard=ctx).logits[0]
    loss = (logits * weights_per_group[gi].index_select(0, idx)).sum()
    loss.backward()
    return gi, logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def kernel_vs_reference(name, device, dtype, tol, seed=0, sizes=((3, 5), (17, 15), (1, 1), (40, 33)), heads=(4, 2), dim=8):
    """Compare block kernel `name` with the reference kernel: causal (equal and unequal lengths,
    bottom-right alignment where the kernel states it) and non-causal, fwd and bwd.

    Returns a list of (label, `tolerance_ratio` under tol=dict(atol, rtol)) over out, lse, dq,
    dk, dv; at most 1 passes.
    """
    from hetsp.testing import tolerance_ratio
    from hetsp.attention.kernels import select_kernel
    from hetsp.attention.kernels.base import Segments
    from hetsp.attention.kernels.reference import REFERENCE_KERNEL

    kern = select_kernel(name, device)
    g = torch.Generator().manual_seed(seed)
    report = []
    for causal in (False, True):
        if causal and kern.causal_alignment != "bottom_right":
            pairs = [(n, n) for n, _ in sizes]
        else:
            pairs = [(nq, nk if not causal else max(nq, nk)) for nq, nk in sizes]
        cu_q, cu_k = [0], [0]
        for nq, nk in pairs:
            cu_q.append(cu_q[-1] + nq)
            cu_k.append(cu_k[-1] + nk)
        seg = Segments(tuple(cu_q), tuple(cu_k))
        q = torch.randn(cu_q[-1], heads[0], dim, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(cu_k[-1], heads[1], dim, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(cu_k[-1], heads[1], dim, generator=g).to(device=device, dtype=dtype)
        do = torch.randn(cu_q[-1], heads[0], dim, generator=g).to(device=device, dtype=dtype)
        o_ref, l_ref = REFERENCE_KERNEL.forward(q, k, v, seg, causal, 0.3)
        o, l = kern.forward(q, k, v, seg, causal, 0.3)
        g_ref = REFERENCE_KERNEL.backward(do, q, k, v, o_ref, l_ref, seg, causal, 0.3)
        g_got = kern.backward(do, q, k, v, o_ref, l_ref, seg, causal, 0.3)
        for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), (o, l) + tuple(g_got), (o_ref, l_ref) + tuple(g_ref)):
            report.append((f"{name} causal={causal} {label}", tolerance_ratio(a, b, **tol)))
    return report


def triton_interpreter_checks():
    """Run under TRITON_INTERPRET=1 (set before triton is imported): Triton kernel vs reference,
    ring attention with the Triton kernel on one rank and on two gloo ranks vs full attention.
    Raises on mismatch."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"
    from hetsp.attention import make_shard_context, ring_attention
    from hetsp.attention.kernels.reference import varlen_attention_ref

    # fp32 kernels on O(1) randn inputs: round-off 6e-8 per operation over at most 40 keys
    tol = dict(atol=1e-5, rtol=1e-5)
    bad = [(lab, e) for lab, e in kernel_vs_reference("triton", "cpu", torch.float32, tol) if not e <= 1]
    bad += [(lab, e) for lab, e in kernel_vs_reference("triton", "cpu", torch.float32, tol, heads=(3, 1), dim=12, sizes=((5, 9), (20, 20))) if not e <= 1]
    assert not bad, bad
    lengths = [9, 1, 21]
    ctx = make_shard_context(lengths, 0, 1, 0, "cpu", kernel="triton")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(31, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(31, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(31, 2, 8, generator=g, requires_grad=True)
    do = torch.randn(31, 4, 8, generator=g)
    out = ring_attention(q, k, v, ctx)
    grads = torch.autograd.grad(out, (q, k, v), do)
    want = varlen_attention_ref(q.double(), k.double(), v.double(), [0, 9, 10, 31])
    want_grads = torch.autograd.grad(want, (q, k, v), do.double())
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    # the ring on 2 gloo ranks with the Triton kernel (spawned ranks inherit TRITON_INTERPRET)
    from hetsp.testing import RankPool
    from tests.test_ring_attention import errors, make_case

    pool = RankPool(2)
    try:
        cases = [make_case([(0, 2)], [[9, 1, 21]], 4, 2, 8, torch.float32, c, 5, kernel="triton") for c in (True, False)]
        per_rank = pool.run(ring_cases, cases)
    finally:
        pool.close()
    errs = [errors(c, [per_rank[r][i] for r in range(2)]) for i, c in enumerate(cases)]
    assert max(errs) <= 1, errs  # the fp32 tolerance of test_ring_attention.TOL
    return "ok"


def nccl_ring_worker(rank, world_size, init_file, groups, kernel, dtype, tol):
    """One NCCL rank (torch.multiprocessing.spawn): ring attention on CUDA for this rank's group
    against fp64 full attention of the group's sequences, computed on the rank itself;
    elementwise within atol = rtol = `tol`."""
    from hetsp.attention import make_shard_context, ring_attention, warm_up
    from hetsp.testing import tolerance_ratio
    from hetsp.attention.kernels.reference import varlen_attention_ref

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        warm_up(torch.device("cuda", rank))
        gi, start, size, lengths = _my_group(groups)
        g = torch.Generator().manual_seed(100 + gi)
        total = sum(lengths)
        full = [torch.randn(total, h, 64, generator=g, dtype=torch.float64).cuda() for h in (8, 2, 2, 8)]
        cu = [0]
        for s in lengths:
            cu.append(cu[-1] + s)
        q, k, v, do = (x.clone().requires_grad_(i < 3) for i, x in enumerate(full))
        want = varlen_attention_ref(q, k, v, cu)
        want_grads = torch.autograd.grad(want, (q, k, v), do)
        ctx = make_shard_context(lengths, start, size, rank, "cuda", kernel=kernel)
        idx = torch.tensor(ctx.layout.token_index, dtype=torch.long, device="cuda")
        mq, mk, mv = (x.detach().index_select(0, idx).to(dtype).requires_grad_(True) for x in (q, k, v))
        out = ring_attention(mq, mk, mv, ctx)
        grads = torch.autograd.grad(out, (mq, mk, mv), do.index_select(0, idx).to(dtype))
        for got, ref in zip((out,) + grads, (want,) + want_grads):
            ref = ref.detach().index_select(0, idx)
            err = tolerance_ratio(got, ref, atol=tol, rtol=tol)
            assert err <= 1, (rank, kernel, dtype, err)
    finally:
        dist.destroy_process_group()
