"""Steps `blocks`, `throughput` and `ssd`: Triton tile sizes, TFLOP/s of the attention kernels
and of the SSD scan against the GPU's peak, and hetsp's kernels against library ones.

Attention shapes: one causal sequence of 4K, 16K or 64K tokens, 32 query heads on 8 kv heads,
head dim 128, bf16 (a 7B-class layer). SSD shapes: 32 heads of dim 64, one group, state 128.
FLOPs are useful FLOPs (`common.attention_flops`, `common.ssd_flops`); peak from
`hetsp.metrics.flops.peak_flops` (None for an unlisted GPU: then no fraction is reported).
"""

from __future__ import annotations

import torch

from hetsp.attention.kernels import select_kernel
from hetsp.metrics.flops import peak_flops

from .common import (TOLERANCES, attention_flops, closeness, cuda_seconds, packed_inputs, segments_of,
                     ssd_flops)
from .exactness import check_case, cuda_kernels

ATTN = dict(heads=32, kv_heads=8, dim=128)
SEQS_FULL = (4096, 16384, 65536)
SEQS_QUICK = (4096,)
TRITON_TILES = ((64, 64), (128, 64), (64, 128), (128, 128))
SSD = dict(heads=32, head_dim=64, groups=1, state=128)


def attention_seconds(kernel, length: int, causal: bool = True, dtype=torch.bfloat16, repeats: int = 5):
    """(forward, backward) median seconds of one block kernel on one sequence of `length`."""
    q, k, v, do = packed_inputs([length], ATTN["heads"], ATTN["kv_heads"], ATTN["dim"], dtype, "cuda", 0)
    seg, scale = segments_of([length]), ATTN["dim"] ** -0.5
    kern = select_kernel(kernel, "cuda")
    out, lse = kern.forward(q, k, v, seg, causal, scale)
    fwd = cuda_seconds(lambda: kern.forward(q, k, v, seg, causal, scale), repeats)
    bwd = cuda_seconds(lambda: kern.backward(do, q, k, v, out, lse, seg, causal, scale), repeats)
    return fwd, bwd


def _tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12


def run_throughput(rec, quick: bool = False) -> None:
    peak = peak_flops("cuda", "bf16")
    seqs = SEQS_QUICK if quick else SEQS_FULL
    best: dict[int, tuple[str, float]] = {}
    for length in seqs:
        f_flops, b_flops = attention_flops([length], ATTN["heads"], ATTN["dim"], causal=True)
        for name in cuda_kernels():
            try:
                fwd, bwd = attention_seconds(name, length)
            except Exception as e:
                rec.row("attention fwd+bwd, causal, bf16", kernel=name, tokens=length, error=f"{type(e).__name__}: {str(e)[:120]}")
                continue
            tf = _tflops(f_flops + b_flops, fwd + bwd)
            rec.row("attention fwd+bwd, causal, bf16", kernel=name, tokens=length, fwd_ms=fwd * 1e3, bwd_ms=bwd * 1e3,
                    fwd_tflops=_tflops(f_flops, fwd), bwd_tflops=_tflops(b_flops, bwd), tflops=tf,
                    of_peak=tf * 1e12 / peak if peak else None)
            if length not in best or tf > best[length][1]:
                best[length] = (name, tf)
    for length in seqs:
        _ssd_row(rec, length)
    rec.data["peak_tflops"] = peak / 1e12 if peak else None
    parts = [f"{length // 1024}K: {n} {tf:.0f} TF/s" for length, (n, tf) in best.items()]
    rec.finish("ok" if best else "fail", "best attention fwd+bwd " + ", ".join(parts)
               + (f" (peak {peak / 1e12:.0f})" if peak else " (peak unknown for this GPU)"))


def _ssd_inputs(length: int, dtype, seed: int = 0, device="cuda", shape=SSD):
    g = torch.Generator().manual_seed(seed)
    H, P, G, N = shape["heads"], shape["head_dim"], shape["groups"], shape["state"]
    x = torch.randn(1, length, H, P, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(1, length, H, generator=g) - 2.0)
    A = -torch.exp(torch.rand(H, generator=g))
    B = torch.randn(1, length, G, N, generator=g) / N ** 0.5
    C = torch.randn(1, length, G, N, generator=g) / N ** 0.5
    dy = torch.randn(1, length, H, P, generator=g)
    return [t.to(device, dtype) for t in (x, dt, A, B, C)], dy.to(device, dtype)


def ssd_impls() -> dict:
    """name -> scan with `ssd_chunk_scan`'s signature (fla's only when fla-core is installed)."""
    from models.kernels.ssd import ssd_chunk_scan
    from models.kernels.ssd_fla import fla_available, ssd_chunk_scan_fla

    impls = {"hetsp": ssd_chunk_scan}
    if fla_available():
        impls["fla"] = ssd_chunk_scan_fla
    return impls


def ssd_seconds(fn, length: int, dtype, repeats: int = 5, **kw) -> float:
    """Median seconds of forward + backward of one scan over one sequence of `length`."""
    ins, dy = _ssd_inputs(length, dtype)
    ins = [t.requires_grad_(True) for t in ins]

    def step():
        y, _ = fn(*ins, **kw)
        torch.autograd.grad(y, ins, dy)

    return cuda_seconds(step, repeats)


def _ssd_row(rec, length: int) -> None:
    peak = peak_flops("cuda", "bf16")
    f, b = ssd_flops(length, SSD["heads"], SSD["head_dim"], SSD["groups"], SSD["state"], 64)
    for name, fn in ssd_impls().items():
        # hetsp's Mamba-2 mixer runs its scan in fp32 (Triton on CUDA); fla is timed in bf16 and fp32.
        for dtype in ((torch.float32,) if name == "hetsp" else (torch.bfloat16, torch.float32)):
            label = str(dtype).replace("torch.", "")
            try:
                s = ssd_seconds(fn, length, dtype)
            except Exception as e:
                rec.row("SSD scan fwd+bwd", impl=name, dtype=label, tokens=length, error=f"{type(e).__name__}: {str(e)[:120]}")
                continue
            tf = _tflops(f + b, s)
            rec.row("SSD scan fwd+bwd", impl=name, dtype=label, tokens=length, ms=s * 1e3, tflops=tf,
                    of_bf16_peak=tf * 1e12 / peak if peak else None)


def run_blocks(rec, quick: bool = False) -> None:
    """Triton attention tiles (exact on a varlen batch, then timed at 16K) and SSD chunk/warps."""
    from hetsp.attention.kernels.triton_kernel import triton_kernel

    length = 4096 if quick else 16384
    results = []
    for bm, bn in TRITON_TILES:
        label = f"{bm}x{bn}"
        try:
            kern = triton_kernel(bm, bn)
            res = check_case(kern, (1, 17, 130, 1000, 3000), 8, 2, 128, torch.bfloat16, True)
            exact = all(r <= 1.0 for r in res.values())
            fwd, bwd = attention_seconds(kern, length)
        except Exception as e:  # e.g. tiles over the shared-memory limit
            rec.row("triton attention tiles", tiles=label, error=f"{type(e).__name__}: {str(e)[:120]}")
            continue
        rec.row("triton attention tiles", tiles=label, exact=exact, tokens=length, fwd_ms=fwd * 1e3, bwd_ms=bwd * 1e3)
        if exact:
            results.append((fwd + bwd, bm, bn))
    ssd_best = _ssd_blocks(rec, length)
    if not results:
        rec.finish("fail", "no Triton tile setting ran exactly")
        return
    t, bm, bn = min(results)
    default = next((r for r in results if (r[1], r[2]) == (64, 64)), None)
    gain = f", {default[0] / t:.2f}x the default 64x64" if default else ""
    rec.finish("ok", f"best Triton tiles {bm}x{bn} at {length // 1024}K ({t * 1e3:.1f} ms fwd+bwd{gain}): "
               f"--set attention.triton_block_m={bm} --set attention.triton_block_n={bn}; SSD {ssd_best}",
               best_tiles=[bm, bn])


def _ssd_blocks(rec, length: int) -> str:
    import functools

    from models.kernels.ssd import ssd_chunk_scan
    from models.kernels.ssd_triton import ssd_intra_triton

    best = None
    for chunk in (32, 64, 128):
        for warps in (4, 8):
            impl = functools.partial(ssd_intra_triton, num_warps=warps)
            try:
                s = ssd_seconds(ssd_chunk_scan, length, torch.float32, chunk_size=chunk, intra_impl=impl)
            except Exception as e:
                rec.row("SSD Triton chunk and warps", chunk=chunk, num_warps=warps, error=f"{type(e).__name__}: {str(e)[:120]}")
                continue
            rec.row("SSD Triton chunk and warps", chunk=chunk, num_warps=warps, tokens=length, ms=s * 1e3)
            if best is None or s < best[0]:
                best = (s, chunk, warps)
    return "none ran" if best is None else f"best chunk {best[1]} with {best[2]} warps ({best[0] * 1e3:.1f} ms)"


def ssd_exactness(fn, lengths, dtype, seed: int = 0, device="cuda", shape=SSD) -> dict[str, float]:
    """{tensor: closeness} of one scan on packed `lengths` (with initial states) vs the fp64 twin."""
    from models.kernels.ssd import ssd_chunk_scan_ref

    total = sum(lengths)
    ins, dy = _ssd_inputs(total, torch.float64, seed, device, shape)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), device=device)
    g = torch.Generator().manual_seed(seed + 1)
    init = torch.randn(len(lengths), shape["heads"], shape["head_dim"], shape["state"], generator=g).to(device, torch.float64) * 0.1
    ref_in = [t.clone().requires_grad_(True) for t in ins + [init]]
    y_ref, f_ref = ssd_chunk_scan_ref(*ref_in[:5], cu_seqlens=cu, initial_states=ref_in[5])
    g_ref = torch.autograd.grad((y_ref * dy).sum() + f_ref.sum(), ref_in)
    got_in = [t.detach().to(dtype).requires_grad_(True) for t in ins + [init]]
    y, f = fn(*got_in[:5], cu_seqlens=cu, initial_states=got_in[5])
    g_got = torch.autograd.grad((y.float() * dy.float()).sum() + f.float().sum(), got_in)
    rtol = TOLERANCES[dtype]
    names = ("y", "final", "dx", "ddt", "dA", "dB", "dC", "dinit")
    return {n: closeness(a, b, rtol) for n, a, b in zip(names, (y, f, *g_got), (y_ref, f_ref, *g_ref))}


def run_ssd(rec, quick: bool = False) -> None:
    """hetsp's SSD scan and fla's chunked kernels: exactness vs the fp64 twin, and speed at 16K."""
    lengths = (1, 5, 64, 200, 700) if quick else (1, 5, 64, 200, 700, 2000)
    impls = ssd_impls()
    verdicts = {}
    for name, fn in impls.items():
        for dtype in ((torch.float32,) if name == "hetsp" else (torch.float32, torch.bfloat16)):
            label = f"{name} {str(dtype).replace('torch.', '')}"
            try:
                res = ssd_exactness(fn, lengths, dtype)
            except Exception as e:
                rec.row("SSD scans vs fp64", impl=label, error=f"{type(e).__name__}: {str(e)[:160]}", ok=False)
                verdicts[label] = False
                continue
            verdicts[label] = all(r <= 1.0 for r in res.values())
            rec.row("SSD scans vs fp64", impl=label, **{k: round(v, 3) for k, v in res.items()}, ok=verdicts[label])
    length = 4096 if quick else 16384
    speed = {}
    for name, fn in impls.items():
        try:
            speed[name] = ssd_seconds(fn, length, torch.float32)
            rec.row("SSD fp32 fwd+bwd", impl=name, tokens=length, ms=speed[name] * 1e3)
        except Exception as e:
            rec.row("SSD fp32 fwd+bwd", impl=name, tokens=length, error=f"{type(e).__name__}: {str(e)[:120]}")
    choice = "hetsp"
    if "fla" not in impls:
        why = "fla-core not installed"
    elif not verdicts.get("fla float32"):
        why = "fla not within fp32 tolerance of the fp64 twin"
    elif "fla" in speed and "hetsp" in speed and speed["fla"] < speed["hetsp"]:
        choice, why = "fla", f"fla exact and {speed['hetsp'] / speed['fla']:.2f}x faster at {length // 1024}K"
    else:
        why = "fla exact but not faster" if "fla" in speed else "fla did not run"
    rec.data["ssd_choice"] = choice
    rec.data["ssd_reason"] = why
    bad = [k for k, ok in verdicts.items() if not ok and k.startswith("hetsp")]
    rec.finish("fail" if bad else "ok", f"SSD exact: {', '.join(k for k, ok in verdicts.items() if ok) or 'none'}; "
               f"GPU path to use: {choice} ({why}): model.extra.ssd_kernel = \"{choice}\"")
