"""Hybrid-model mixer benchmark: prints a table (not a test).

CPU (always): tokens/s of forward+backward of one layer (mixer + SwiGLU MLP) per mixer kind,
with the sequential reference kernels (`REFERENCE_KERNELS`) and with the chunked kernels
(`KERNELS`), at a few lengths. Attention has no reference twin: both columns run the same
path (sdpa). The Triton SSD kernel is run under TRITON_INTERPRET=1 at a tiny size for
correctness only (interpreter timings mean nothing).
GPU (when CUDA exists): forward+backward time of the SSD chunk scan with the Triton
within-chunk kernel against the torch chunked version.

    python bench/mixers.py [--lengths 256 1024 4096] [--hidden 64] [--repeats 3] [--threads 1] [--out bench/results/mixers.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import MIXER_KINDS, HybridConfig, HybridForCausalLM  # noqa: E402
from models.kernels import KERNELS, REFERENCE_KERNELS  # noqa: E402


def _layer(kind: str, hidden: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = HybridConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, layer_pattern=kind, s4d_state_size=32, ema_dim=16,
        mamba_d_state=32, mamba_head_dim=32, mamba_chunk_size=64, scan_chunk_size=64,
        seqboat_window=128, seqboat_z_dim=32, seqboat_v_dim=2 * hidden,
    )
    model = HybridForCausalLM(cfg).train()
    return model


def _time_fwd_bwd(model, length: int, hidden: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, length, hidden, generator=g, requires_grad=True)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = model.model(inputs_embeds=x).last_hidden_state
        out.square().mean().backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_table(lengths, hidden, repeats, ref_max_len):
    rows = [
        "| mixer | length | reference tok/s | chunked tok/s | speed-up | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for kind in MIXER_KINDS:
        model = _layer(kind, hidden)
        for length in lengths:
            chunked = length / _time_fwd_bwd(model, length, hidden, repeats)
            if kind != "attention" and length <= ref_max_len:
                model.set_kernels(**REFERENCE_KERNELS)
                ref = length / _time_fwd_bwd(model, length, hidden, max(1, repeats // 2))
                model.set_kernels(**KERNELS)
                ref_s, speed = f"{ref:,.0f}", f"{chunked / ref:.1f}x"
            else:
                ref_s, speed = ("same path" if kind == "attention" else "skipped (too slow)"), "-"
            ratios = model.mixer_metrics()
            note = f"activation ratio {next(iter(ratios.values())):.2f}" if ratios else ""
            rows.append(f"| {kind} | {length} | {ref_s} | {chunked:,.0f} | {speed} | {note} |")
            print(rows[-1], flush=True)
    return rows


TRITON_CHECK = """
import torch
from models.kernels.ssd import ssd_chunk_scan
from models.kernels.ssd_triton import ssd_intra_triton
torch.manual_seed(0)
x, dt = torch.randn(1, 40, 4, 16), torch.nn.functional.softplus(torch.randn(1, 40, 4))
A, B, C = -torch.rand(4) - 0.1, torch.randn(1, 40, 1, 16), torch.randn(1, 40, 1, 16)
outs = []
for impl in (ssd_intra_triton, None):
    ins = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    y, f = ssd_chunk_scan(*ins, 16, intra_impl=impl)
    outs.append([y, f, *torch.autograd.grad(y.sum() + f.sum(), ins)])
print(max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*outs)))
"""


def triton_interpreter_check() -> str:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        return f"FAILED: {proc.stderr.strip().splitlines()[-1]}"
    return (
        "max over outputs and gradients of max|Triton - torch| / max|torch| "
        f"(fp32, 40 tokens, chunk 16): {float(proc.stdout):.2e}"
    )


def gpu_table(lengths, repeats):
    from models.kernels.ssd import ssd_chunk_scan
    from models.kernels.ssd_triton import ssd_intra_triton

    rows = ["| SSD scan (H=8, P=64, N=64, Q=64) | length | torch ms | Triton ms | speed-up |", "|---|---:|---:|---:|---:|"]
    for length in lengths:
        ins0 = [torch.randn(1, length, 8, 64, device="cuda"), torch.rand(1, length, 8, device="cuda") * 0.1,
                -torch.rand(8, device="cuda") - 0.5, torch.randn(1, length, 1, 64, device="cuda"),
                torch.randn(1, length, 1, 64, device="cuda")]
        res = {}
        for name, impl in (("torch", None), ("triton", ssd_intra_triton)):
            times = []
            for i in range(repeats + 2):
                ins = [t.clone().requires_grad_() for t in ins0]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                y, f = ssd_chunk_scan(*ins, 64, intra_impl=impl)
                (y.sum() + f.sum()).backward()
                torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            res[name] = statistics.median(times) * 1e3
        rows.append(f"| | {length} | {res['torch']:.2f} | {res['triton']:.2f} | {res['torch'] / res['triton']:.1f}x |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-max-len", type=int, default=4096, help="skip the sequential kernels above this length")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables as markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    header = [
        "Command: python bench/mixers.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; fp32, batch 1, hidden {args.hidden}, median of {args.repeats}.",
        "Shared machine (other jobs running): timings are noisy, easily 2x between runs.",
        "",
    ]
    print(header[2])
    lines = header + ["## CPU: one layer (mixer + MLP), forward + backward", ""]
    lines += cpu_table(args.lengths, args.hidden, args.repeats, args.ref_max_len)
    check = triton_interpreter_check()
    print("Triton SSD kernel under TRITON_INTERPRET=1:", check)
    lines += ["", "## Triton SSD kernel, interpreter (correctness only)", "", check, ""]
    if torch.cuda.is_available():
        lines += [f"## GPU: {torch.cuda.get_device_name()}", ""] + gpu_table(args.lengths, args.repeats)
    else:
        lines += ["## GPU", "", "No CUDA device on this machine: the Triton-vs-torch GPU comparison was not run."]
        print("No CUDA: GPU comparison skipped")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
