"""Step `exactness`: every CUDA block kernel against the fp64 reference at real sizes.

Packed variable-length batches with sequences from 1 to 64K tokens, GQA (8 query heads on
2 kv heads), causal and not, forward (out, lse) and backward (dq, dk, dv from the kernel's
own out and lse); bf16 for every kernel, fp32 for the Triton kernel (IEEE dots). A case
passes when every tensor is within `common.TOLERANCES` of the reference.
"""

from __future__ import annotations

import importlib.util

import torch

from hetsp.attention.kernels import select_kernel

from .common import TOLERANCES, closeness, packed_inputs, reference_fp64, segments_of

LENGTHS_FULL = (1, 2, 17, 130, 1000, 4096, 16384, 65536)
LENGTHS_QUICK = (1, 2, 17, 130, 1000)
TENSORS = ("out", "lse", "dq", "dk", "dv")


def cuda_kernels() -> list[str]:
    """Names of the block kernels that can run here on CUDA (flash-attn only when installed)."""
    names = ["triton", "torch_flash"]
    if importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attn")
    return names


def check_case(kernel, lengths, heads, kv_heads, dim, dtype, causal, seed=0, device="cuda", want=None):
    """{tensor: closeness} of `kernel` (a name or BlockKernel) on one packed batch (<= 1 passes).

    want: the fp64 reference of these inputs (`reference_fp64`), computed here when None.
    """
    q, k, v, do = packed_inputs(lengths, heads, kv_heads, dim, dtype, device, seed)
    scale = dim ** -0.5
    seg = segments_of(lengths)
    if want is None:
        want = reference_fp64(q, k, v, do, lengths, causal, scale)
    kern = select_kernel(kernel, device)
    out, lse = kern.forward(q, k, v, seg, causal, scale)
    grads = kern.backward(do, q, k, v, out, lse, seg, causal, scale)
    rtol = TOLERANCES[dtype]
    return {name: closeness(g, w, rtol) for name, g, w in zip(TENSORS, (out, lse, *grads), want)}


def run(rec, quick: bool = False) -> None:
    lengths = LENGTHS_QUICK if quick else LENGTHS_FULL
    skipped = [] if importlib.util.find_spec("flash_attn") else ["flash_attn (not installed)"]
    cases = [(name, torch.bfloat16) for name in cuda_kernels()] + [("triton", torch.float32)]
    shape = (8, 2, 128)  # query heads, kv heads (GQA), head dim
    worst, failed, passed = 0.0, [], 0
    for causal in (True, False):
        for dtype in (torch.bfloat16, torch.float32):
            # one fp64 reference per input set, shared by every kernel that takes these inputs
            q, k, v, do = packed_inputs(lengths, *shape, dtype, "cuda", 0)
            want = reference_fp64(q, k, v, do, lengths, causal, shape[2] ** -0.5)
            del q, k, v, do
            for name in [n for n, d in cases if d == dtype]:
                label = f"{name} {str(dtype).replace('torch.', '')} causal={causal}"
                try:
                    res = check_case(name, lengths, *shape, dtype, causal, want=want)
                except Exception as e:  # a kernel that cannot run here is a finding, not a crash of the step
                    rec.row("kernels vs fp64", case=label, error=f"{type(e).__name__}: {str(e)[:160]}", ok=False)
                    failed.append(label)
                    continue
                ok = all(r <= 1.0 for r in res.values())
                worst = max(worst, max(res.values()))
                if ok:
                    passed += 1
                else:
                    failed.append(label)
                rec.row("kernels vs fp64", case=label, **{t: round(r, 3) for t, r in res.items()}, ok=ok)
            del want
    rec.data["lengths"] = list(lengths)
    rec.data["skipped"] = skipped
    status = "ok" if not failed else "fail"
    summary = (f"{passed}/{len(cases) * 2} kernel cases within tolerance "
               f"(lengths {min(lengths)}..{max(lengths)}, GQA 8/2, D 128, worst |err|/tol {worst:.2f})")
    if failed:
        summary += "; failed: " + ", ".join(failed)
    if skipped:
        summary += "; skipped: " + ", ".join(skipped)
    rec.finish(status, summary)
