"""Local block kernels against the plain-torch reference; kernel choice; the online merge."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from . import attn_fns

ROOT = Path(__file__).resolve().parents[1]


# the second set repeats shapes at fixed and broken strides, which the CPU kernel batches
SIZES = [((3, 5), (17, 15), (1, 1), (40, 33)), ((3, 5), (3, 5), (7, 7), (3, 5), (3, 5), (3, 5), (1, 1), (1, 1), (2, 1))]


# Elementwise |got - ref| <= atol + rtol |ref| on O(1) randn inputs. fp64: two orders of summation
# over at most 40 keys differ by ~1e-15; atol 1e-12 also covers the exact zeros of a 1-key causal
# row's dq and dk, where a CPU flash kernel may return round-off. fp32: unit round-off 6e-8.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(atol=1e-12, rtol=1e-10)), (torch.float32, dict(atol=1e-5, rtol=1e-5))])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("sizes", SIZES)
def test_torch_cpu_matches_reference(dtype, tol, heads, sizes):
    report = attn_fns.kernel_vs_reference("torch_cpu", "cpu", dtype, tol, heads=heads, sizes=sizes)
    bad = [(lab, e) for lab, e in report if not e <= 1]
    assert not bad, bad


def test_torch_cpu_op_aligns_causal_top_left():
    """The stated alignment of the CPU op: with fewer queries than keys, query i sees keys j <= i."""
    from hetsp.attention.kernels.base import Segments
    from hetsp.attention.kernels.torch_cpu import TORCH_CPU_KERNEL

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 1, 4, generator=g, dtype=torch.float64) for n in (3, 5, 5))
    out, _ = TORCH_CPU_KERNEL.forward(q, k, v, Segments((0, 3), (0, 5)), True, 0.5)
    s = (q[:, 0] @ k[:, 0].T) * 0.5
    s = s.masked_fill(torch.ones(3, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out[:, 0], torch.softmax(s, -1) @ v[:, 0])


def test_merge_handles_rows_without_keys():
    from hetsp.attention.ring import _merge

    out = torch.zeros(3, 1, 2)
    lse = torch.full((3, 1), float("-inf"))
    o_b = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[float("nan"), float("nan")]]])
    lse_b = torch.tensor([[0.5], [float("-inf")], [float("-inf")]])
    _merge(out, lse, None, o_b, lse_b)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]]]))
    assert lse[0, 0] == 0.5 and lse[1, 0] == float("-inf")
    # a second block with equal lse halves the difference: stable form gives the exact average
    _merge(out, lse, torch.tensor([0]), torch.tensor([[[3.0, 4.0]]]), torch.tensor([[0.5]]))
    torch.testing.assert_close(out[0], torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(lse[0], torch.tensor([0.5 + torch.log(torch.tensor(2.0)).item()]))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_kernel_choice_is_logged_once():
    from hetsp.attention import kernels

    log = logging.getLogger("hetsp.attention")
    handler, level = _Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        kernels._log_choice.cache_clear()
        kern = kernels.select_kernel("auto", "cpu")
        kernels.select_kernel("auto", "cpu")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert kern.name == "torch_cpu"
    assert handler.messages == ["attention block kernel: torch_cpu (auto: cpu device)"]


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    """select_kernel reads TRITON_INTERPRET when called, so the refusal is tested whatever this
    process was started with."""
    from hetsp.attention import kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device .* or TRITON_INTERPRET=1"):
        kernels.select_kernel("triton", "cpu")


def test_triton_kernel_in_interpreter():
    """Triton fwd+bwd vs reference on CPU; TRITON_INTERPRET must be set before triton is imported."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from tests import attn_fns; print(attn_fns.triton_interpreter_checks())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "flash_attn"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(atol=1e-4, rtol=1e-4)), (torch.bfloat16, dict(atol=2e-2, rtol=2e-2))])
def test_cuda_kernels_match_reference(name, dtype, tol):
    """fp32: TF32-free kernels with fp32 accumulation over up to 1000 keys; bf16: unit round-off
    4e-3 on O(1) values, a few roundings deep."""
    if name == "flash_attn":
        pytest.importorskip("flash_attn")
        if dtype == torch.float32:
            pytest.skip("flash-attn takes fp16/bf16 only")
    sizes = ((300, 300), (1, 1), (129, 517), (1000, 1000))
    report = attn_fns.kernel_vs_reference(name, "cuda", dtype, tol, sizes=sizes, heads=(8, 2), dim=64)
    bad = [(lab, e) for lab, e in report if not e <= 1]
    assert not bad, bad
