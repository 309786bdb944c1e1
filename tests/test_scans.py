"""Every sequence kernel of the hybrid models against its sequential `_ref` twin: outputs and all gradients.

fp64 must agree to 1e-10; fp32 is checked at rtol/atol 1e-4 (accumulation order differs between the
chunked and sequential forms). The Triton SSD kernel runs in a subprocess under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models.kernels import (
    causal_conv1d,
    causal_conv1d_ref,
    ema_scan,
    ema_scan_ref,
    local_attention,
    local_attention_ref,
    s4d_scan,
    s4d_scan_ref,
    ssd_chunk_scan,
    ssd_chunk_scan_ref,
    ssd_intra,
    ssd_intra_torch,
)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
# (batch, length, cu_seqlens): rows as segments; packed documents incl. an empty one and ones shorter than a chunk.
CASES = [
    (2, 13, None),
    (1, 29, [0, 5, 6, 20, 20, 29]),
    (1, 7, [0, 7]),
]


def _cu(cu):
    return None if cu is None else torch.tensor(cu, dtype=torch.int32)


def _num_segments(batch, cu):
    return batch if cu is None else len(cu) - 1


def _compare(fast, ref, inputs, dtype):
    """Run both on leaf copies of `inputs`; compare outputs and the gradients of every input."""
    leaves_a = [t.detach().clone().requires_grad_(t.is_floating_point() or t.is_complex()) if t is not None else None for t in inputs]
    leaves_b = [t.detach().clone().requires_grad_(t.is_floating_point() or t.is_complex()) if t is not None else None for t in inputs]
    out_a, out_b = fast(*leaves_a), ref(*leaves_b)
    out_a = out_a if isinstance(out_a, tuple) else (out_a,)
    out_b = out_b if isinstance(out_b, tuple) else (out_b,)
    gen = torch.Generator().manual_seed(1)
    loss_a = loss_b = 0
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(a, b, **TOL[dtype])
        w = torch.randn(a.shape, generator=gen, dtype=dtype)
        loss_a = loss_a + (a.real * w).sum() + (a.imag * w).sum() if a.is_complex() else loss_a + (a * w).sum()
        loss_b = loss_b + (b.real * w).sum() + (b.imag * w).sum() if b.is_complex() else loss_b + (b * w).sum()
    grads_a = torch.autograd.grad(loss_a, [t for t in leaves_a if t is not None and t.requires_grad])
    grads_b = torch.autograd.grad(loss_b, [t for t in leaves_b if t is not None and t.requires_grad])
    assert len(grads_a) == len(grads_b) > 0
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, **TOL[dtype])


def _s4d_params(H, N, dtype):
    ctype = torch.complex128 if dtype == torch.float64 else torch.complex64
    dt = torch.exp(torch.empty(H, 1, dtype=dtype).uniform_(-4, -1))
    a = torch.complex(-0.5 * torch.ones(H, N, dtype=dtype), torch.pi * torch.arange(N, dtype=dtype).expand(H, N))
    a_bar = torch.exp(dt * a)
    b_bar = ((a_bar - 1) / a).to(ctype)
    c = torch.randn(H, N, dtype=ctype)
    return a_bar.to(ctype), b_bar, c


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("batch,length,cu", CASES)
def test_s4d_scan_matches_ref(batch, length, cu, with_init, dtype):
    torch.manual_seed(0)
    H, N = 3, 4
    a_bar, b_bar, c = _s4d_params(H, N, dtype)
    u = torch.randn(batch, length, H, dtype=dtype)
    init = torch.randn(_num_segments(batch, cu), H, N, dtype=a_bar.dtype) if with_init else None
    fast = lambda u, a, b, c, i: s4d_scan(u, a, b, c, _cu(cu), i, chunk_size=4)  # noqa: E731
    ref = lambda u, a, b, c, i: s4d_scan_ref(u, a, b, c, _cu(cu), i)  # noqa: E731
    _compare(fast, ref, [u, a_bar, b_bar, c, init], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("batch,length,cu", CASES)
def test_ema_scan_matches_ref(batch, length, cu, with_init, dtype):
    torch.manual_seed(0)
    H, N = 3, 4
    q = torch.rand(H, N, dtype=dtype) * 0.9 + 0.05
    pb, gamma = torch.randn(H, N, dtype=dtype), torch.randn(H, N, dtype=dtype)
    x = torch.randn(batch, length, H, dtype=dtype)
    init = torch.randn(_num_segments(batch, cu), H, N, dtype=dtype) if with_init else None
    fast = lambda x, q, p, g, i: ema_scan(x, q, p, g, _cu(cu), i, chunk_size=4)  # noqa: E731
    ref = lambda x, q, p, g, i: ema_scan_ref(x, q, p, g, _cu(cu), i)  # noqa: E731
    _compare(fast, ref, [x, q, pb, gamma, init], dtype)


def _ssd_inputs(batch, length, cu, with_init, dtype, H=4, P=3, G=2, N=5):
    x = torch.randn(batch, length, H, P, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, H, dtype=dtype))
    A = -torch.rand(H, dtype=dtype) * 2 - 0.1
    B, C = torch.randn(batch, length, G, N, dtype=dtype), torch.randn(batch, length, G, N, dtype=dtype)
    init = torch.randn(_num_segments(batch, cu), H, P, N, dtype=dtype) if with_init else None
    return [x, dt, A, B, C, init]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("batch,length,cu", CASES)
def test_ssd_chunk_scan_matches_ref(batch, length, cu, with_init, dtype):
    torch.manual_seed(0)
    fast = lambda x, dt, A, B, C, i: ssd_chunk_scan(x, dt, A, B, C, 4, _cu(cu), i)  # noqa: E731
    ref = lambda x, dt, A, B, C, i: ssd_chunk_scan_ref(x, dt, A, B, C, 4, _cu(cu), i)  # noqa: E731
    _compare(fast, ref, _ssd_inputs(batch, length, cu, with_init, dtype), dtype)


def test_ssd_custom_backward_matches_autograd():
    """SSDIntra's hand-written backward (three forward calls) equals autograd through the torch kernel."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    inputs = [torch.randn(3, 8, 4, 3, **f64), -torch.rand(3, 8, 4, **f64), torch.randn(3, 8, 2, 5, **f64), torch.randn(3, 8, 2, 5, **f64)]
    _compare(lambda *t: ssd_intra(*t, impl=ssd_intra_torch), ssd_intra_torch, inputs, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_halo", [False, True])
@pytest.mark.parametrize("batch,length,cu", CASES)
def test_causal_conv1d_matches_ref(batch, length, cu, with_halo, dtype):
    torch.manual_seed(0)
    D, K = 3, 4
    x = torch.randn(batch, length, D, dtype=dtype)
    w, b = torch.randn(D, K, dtype=dtype), torch.randn(D, dtype=dtype)
    halo = torch.randn(_num_segments(batch, cu), K - 1, D, dtype=dtype) if with_halo else None
    fast = lambda x, w, b, h: causal_conv1d(x, w, b, _cu(cu), h)  # noqa: E731
    ref = lambda x, w, b, h: causal_conv1d_ref(x, w, b, _cu(cu), h)  # noqa: E731
    _compare(fast, ref, [x, w, b, halo], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window", [1, 3, 4, 32])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_local_attention_matches_ref(window, with_prefix, dtype):
    torch.manual_seed(0)
    batch, m, z, e = 2, 11, 4, 5
    q, k, v = torch.randn(batch, m, z, dtype=dtype), torch.randn(batch, m, z, dtype=dtype), torch.randn(batch, m, e, dtype=dtype)
    seg = torch.randint(0, 3, (batch, m)).sort(1).values
    seg[:, -2:] = -1  # empty slots at the end of the packed rows
    prefix = [None, None, None]
    if with_prefix:
        prefix = [torch.randn(batch, 2, z, dtype=dtype), torch.randn(batch, 2, e, dtype=dtype), torch.zeros(batch, 2, dtype=torch.long)]
    fast = lambda q, k, v, pk, pv: local_attention(q, k, v, seg, window, 0.5, pk, pv, prefix[2])  # noqa: E731
    ref = lambda q, k, v, pk, pv: local_attention_ref(q, k, v, seg, window, 0.5, pk, pv, prefix[2])  # noqa: E731
    _compare(fast, ref, [q, k, v, prefix[0], prefix[1]], dtype)


def test_packed_scans_equal_separate_documents():
    """A packed row gives, document by document, what each document gives alone (and its final state)."""
    torch.manual_seed(0)
    cu = [0, 6, 7, 19]
    x, dt, A, B, C, _ = _ssd_inputs(1, 19, cu, False, torch.float64)
    y, final = ssd_chunk_scan(x, dt, A, B, C, 4, _cu(cu))
    for s in range(3):
        sl = slice(cu[s], cu[s + 1])
        y_s, f_s = ssd_chunk_scan(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], 4)
        torch.testing.assert_close(y[:, sl], y_s)
        torch.testing.assert_close(final[s : s + 1], f_s)


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from models.kernels import ssd_chunk_scan_ref
    from models.kernels.ssd import ssd_chunk_scan
    from models.kernels.ssd_triton import ssd_intra_triton

    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        torch.manual_seed(0)
        H, P, G, N, L = 4, 3, 2, 5, 21
        cu = torch.tensor([0, 6, 7, 21], dtype=torch.int32)
        leaves = [torch.randn(1, L, H, P, dtype=dtype),
                  torch.nn.functional.softplus(torch.randn(1, L, H, dtype=dtype)),
                  -torch.rand(H, dtype=dtype) - 0.1,
                  torch.randn(1, L, G, N, dtype=dtype), torch.randn(1, L, G, N, dtype=dtype),
                  torch.randn(3, H, P, N, dtype=dtype)]
        results = []
        for fn in (lambda *t: ssd_chunk_scan(*t[:5], 8, cu, t[5], intra_impl=ssd_intra_triton),
                   lambda *t: ssd_chunk_scan_ref(*t[:5], 8, cu, t[5])):
            ins = [t.clone().requires_grad_() for t in leaves]
            y, final = fn(*ins)
            g = torch.Generator().manual_seed(1)
            loss = (y * torch.randn(y.shape, generator=g, dtype=dtype)).sum() + (final * torch.randn(final.shape, generator=g, dtype=dtype)).sum()
            results.append([y, final, *torch.autograd.grad(loss, ins)])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    print("TRITON_OK")
    """
)


def test_triton_ssd_kernel_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "TRITON_OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.gpu
def test_triton_ssd_kernel_on_cuda_matches_torch():
    from models.kernels.ssd_triton import ssd_intra_triton

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(2, 1024, 8, 64, device=dev)
    dt = torch.nn.functional.softplus(torch.randn(2, 1024, 8, device=dev) - 3)
    A = -torch.rand(8, device=dev) * 4 - 0.5
    B, C = torch.randn(2, 1024, 1, 64, device=dev), torch.randn(2, 1024, 1, 64, device=dev)
    leaves = [x, dt, A, B, C]
    outs = []
    for impl in (ssd_intra_triton, None):
        ins = [t.clone().requires_grad_() for t in leaves]
        y, final = ssd_chunk_scan(*ins, 64, intra_impl=impl)
        loss = (y * torch.linspace(-1, 1, y.numel(), device=dev).view_as(y)).sum() + final.sum()
        outs.append([y, final, *torch.autograd.grad(loss, ins)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
