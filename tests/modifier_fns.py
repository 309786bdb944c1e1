"""Checks of the attention score modifiers run in a subprocess under TRITON_INTERPRET=1."""

from __future__ import annotations

import torch


def _segments_with_gaps():
    """Segments whose query and key rows are two position runs each (a zigzag diagonal block),
    plus an off-diagonal one where some queries see no key."""
    from hetsp.attention.kernels.base import Segments

    q_pos = list(range(0, 9)) + list(range(30, 41)) + list(range(50, 56))
    k_pos = list(range(0, 9)) + list(range(30, 41)) + list(range(40, 52))
    return Segments((0, 20, 26), (0, 20, 32), q_pos=tuple(q_pos), k_pos=tuple(k_pos))


def triton_modifier_checks():
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"
    from hetsp.attention import make_shard_context, ring_attention
    from hetsp.attention.kernels.reference import REFERENCE_KERNEL, varlen_attention_ref
    from hetsp.attention.kernels.triton_kernel import TRITON_KERNEL

    g = torch.Generator().manual_seed(0)
    seg = _segments_with_gaps()
    for heads, kv in ((4, 2), (3, 1)):
        q = torch.randn(26, heads, 8, generator=g)
        k = torch.randn(32, kv, 8, generator=g)
        v = torch.randn(32, kv, 8, generator=g)
        do = torch.randn(26, heads, 8, generator=g)
        for window, softcap in ((5, None), (None, 0.8), (12, 1.5)):
            mods = {n: x for n, x in (("window", window), ("softcap", softcap)) if x is not None}
            causal = window is None  # with a window the mask comes from positions (kernels/base.py)
            o_ref, l_ref = REFERENCE_KERNEL.forward(q.double(), k.double(), v.double(), seg, causal, 0.4, **mods)
            o, l = TRITON_KERNEL.forward(q, k, v, seg, causal, 0.4, **mods)
            # rows that see no key: -inf in both
            assert torch.equal(torch.isinf(l), torch.isinf(l_ref)), (window, softcap)
            fin = torch.isfinite(l_ref)
            # fp32 kernel against an fp64 reference: ~1e-6 rounding
            torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(l.double()[fin], l_ref[fin], rtol=1e-5, atol=1e-5)
            l_final = torch.where(fin, l_ref, torch.zeros_like(l_ref))
            want = REFERENCE_KERNEL.backward(do.double(), q.double(), k.double(), v.double(), o_ref, l_final, seg, causal, 0.4, **mods)
            got = TRITON_KERNEL.backward(do, q, k, v, o_ref.float(), l_final.float(), seg, causal, 0.4, **mods)
            for a, b in zip(got, want):
                torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    # the whole ring on one rank with the Triton kernel, against full attention
    lengths = [30, 1, 12]
    ctx = make_shard_context(lengths, 0, 1, 0, "cpu", kernel="triton")
    q = torch.randn(43, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(43, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(43, 2, 8, generator=g, requires_grad=True)
    do = torch.randn(43, 4, 8, generator=g)
    out = ring_attention(q, k, v, ctx, window=7, softcap=2.0)
    grads = torch.autograd.grad(out, (q, k, v), do)
    want = varlen_attention_ref(q.double(), k.double(), v.double(), [0, 30, 31, 43], window=7, softcap=2.0)
    want_grads = torch.autograd.grad(want, (q, k, v), do.double())
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    return "ok"
