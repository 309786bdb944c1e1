"""Ring attention benchmark: prints tables (not a test).

CPU (always): for 2 and 4 gloo ranks, causal fwd+bwd time of ring attention against one
process doing the same total work, and the fraction of communication hidden behind compute:
    hidden = 1 - (time the ring spent blocked waiting for exchanges) / (communication only),
clipped to [0, 1] and averaged over ranks, where "communication only" replays the ring's
exchanges without compute. "compute only" replays the ring with a no-op exchange.
Times are the slowest rank's median.
GPU (when CUDA exists): fwd+bwd TFLOP/s of the local block kernels and of the ring on
simulated ranks (each rank's blocks run in turn on one GPU; the slowest rank sets the time)
against torch's scaled_dot_product_attention on the full sequences.

With --window W (sliding window of W keys, itself included): a table of the block calls each
rank makes and their fwd+bwd compute time, with and without the window (blocks whose keys lie
outside every local query's window are skipped), ranks run in turn in one process.

    python bench/ring_attention.py [--lengths 4096] [--ranks 2 4] [--repeats 5] [--window W]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _inputs(n, heads, kv_heads, dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, dim, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    k = torch.randn(n, kv_heads, dim, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    v = torch.randn(n, kv_heads, dim, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    do = torch.randn(n, heads, dim, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do


class _NoExchange:
    """Stands in for RingExchange: no communication, a block of the right shape at once."""

    def __init__(self, *args):
        pass

    def start(self, send, recv_shape, tag):
        buf = torch.zeros(recv_shape, dtype=send.dtype, device=send.device)
        return type("Done", (), {"wait": staticmethod(lambda: buf)})()


def _timed(fn, repeats, sync):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_rank(lengths, heads, kv_heads, dim, repeats):
    """On every rank of the pool: (ring, compute only, communication only) seconds."""
    import torch.distributed as dist

    from hetsp.attention import comm, make_shard_context, ring, ring_attention

    rank, d = dist.get_rank(), dist.get_world_size()
    ctx = make_shard_context(lengths, 0, d, rank, "cpu", kernel="torch_cpu")
    q, k, v, do = _inputs(ctx.num_tokens, heads, kv_heads, dim, torch.float32, "cpu", seed=rank)

    def step():
        q.grad = k.grad = v.grad = None
        ring_attention(q, k, v, ctx).backward(do)

    barrier = dist.barrier
    waits: list[float] = []

    class TimedExchange(comm.RingExchange):
        """The real exchange, recording the time spent blocked in wait() (exposed communication)."""

        def start(self, send, recv_shape, tag):
            pending = super().start(send, recv_shape, tag)
            inner = pending.wait

            def wait():
                t0 = time.perf_counter()
                out = inner()
                waits.append(time.perf_counter() - t0)
                return out

            pending.wait = wait
            return pending

    original = ring.RingExchange
    exposed = []

    def timed_step():
        waits.clear()
        step()
        exposed.append(sum(waits))

    ring.RingExchange = TimedExchange
    try:
        t_ring = _timed(timed_step, repeats, barrier)
        ring.RingExchange = _NoExchange
        t_compute = _timed(step, repeats, barrier)
    finally:
        ring.RingExchange = original
    t_exposed = statistics.median(exposed[1:])

    ex = comm.RingExchange(0, d, rank)
    kv = torch.stack([k.detach(), v.detach()])

    def shape(src):
        return (2, ctx.layouts[src].num_tokens, kv_heads, dim)

    def exchanges():
        # forward K/V, backward K/V, then the travelling fp32 dK/dV including the hop home
        for _ in range(2):
            buf = kv
            for t in range(1, d):
                buf = ex.start(buf, shape((rank - t) % d), comm.TAG_KV).wait()
        buf = kv.float()
        for t in range(d):
            buf = ex.start(buf, shape((rank - t - 1) % d), comm.TAG_DKV).wait()

    t_comm = _timed(exchanges, repeats, barrier)
    return t_ring, t_compute, t_comm, t_exposed


def one_process(lengths, heads, kv_heads, dim, repeats):
    from hetsp.attention import make_shard_context, ring_attention

    torch.set_num_threads(1)
    ctx = make_shard_context(lengths, 0, 1, 0, "cpu", kernel="torch_cpu")
    q, k, v, do = _inputs(ctx.num_tokens, heads, kv_heads, dim, torch.float32, "cpu", seed=0)

    def step():
        q.grad = k.grad = v.grad = None
        ring_attention(q, k, v, ctx).backward(do)

    return _timed(step, repeats, lambda: None)


def cpu_table(args):
    from hetsp.testing import RankPool

    base = one_process(args.lengths, args.heads, args.kv_heads, args.dim, args.repeats)
    rows = [("1 (one process)", base, base, 0.0, 0.0, 1.0, float("nan"))]
    for d in args.ranks:
        pool = RankPool(d)
        try:
            res = pool.run(cpu_rank, args.lengths, args.heads, args.kv_heads, args.dim, args.repeats, timeout=1800)
        finally:
            pool.close()
        t_ring, t_comp, t_comm, t_exposed = (max(r[i] for r in res) for i in range(4))
        # hidden: share of the exchanges' own time (replayed alone) that the ring did not wait for
        hidden = statistics.mean(min(1.0, max(0.0, 1.0 - r[3] / r[2])) for r in res if r[2] > 0) if t_comm > 0 else float("nan")
        rows.append((f"{d}", t_ring, t_comp, t_comm, t_exposed, base / t_ring, hidden))
    # the same blocks run in turn in this one process: the split of work without core contention
    from hetsp.attention.kernels import select_kernel

    kern = select_kernel("torch_cpu", "cpu")
    alone = {
        d: simulated_ring_seconds(args.lengths, d, kern, args.heads, args.kv_heads, args.dim, torch.float32, "cpu", args.repeats, lambda: None)
        for d in [1] + list(args.ranks)
    }
    print(f"\nCPU, gloo, torch_cpu kernel, fp32, causal; lengths={args.lengths} heads={args.heads} kv_heads={args.kv_heads} "
          f"dim={args.dim}; one thread per rank, {os.cpu_count()} cores; slowest rank, median of {args.repeats}")
    print("| ranks | ring fwd+bwd (s) | compute only (s) | comm only (s) | comm exposed in ring (s) | speed-up vs one process | comm hidden |")
    print("|---|---|---|---|---|---|---|")
    for name, t_ring, t_comp, t_comm, t_exp, speed, hidden in rows:
        print(f"| {name} | {t_ring:.4f} | {t_comp:.4f} | {t_comm:.4f} | {t_exp:.4f} | {speed:.2f} | {hidden:.0%} |".replace("nan%", "-"))
    print("\nBlock kernels only (fwd+bwd of every block a rank computes), ranks run in turn in one process:")
    print("| ranks | slowest rank (s) | mean rank (s) | balance (mean/slowest) | ideal speed-up of compute (one rank's share) |")
    print("|---|---|---|---|---|")
    for d, (t_max, t_mean) in alone.items():
        print(f"| {d} | {t_max:.4f} | {t_mean:.4f} | {t_mean / t_max:.0%} | {alone[1][0] / t_max:.2f} |")


def _attn_flops(lengths, heads, dim, causal=True):
    """fwd+bwd FLOPs: 4 s^2 H D for the forward (halved when causal), backward 2.5x the forward."""
    fwd = sum(4 * s * s * heads * dim for s in lengths) * (0.5 if causal else 1.0)
    return 3.5 * fwd


def simulated_ring_seconds(lengths, d, kernel, heads, kv_heads, dim, dtype, device, repeats, sync, window=None, counts=None):
    """Per rank, the fwd+bwd time of all its ring blocks run in turn; returns (max, mean) seconds.
    `window`: sliding window (blocks outside it skipped); `counts`: list that gets each rank's block calls."""
    from hetsp.attention.kernels.base import acc_dtype
    from hetsp.attention.steps import ring_steps
    from hetsp.layout import group_layouts

    layouts = group_layouts(lengths, d)
    per_rank = []
    for r in range(d):
        steps = ring_steps(layouts, r, True, window)
        mods = {} if window is None else {"window": window}
        blocks = []
        for st in steps:
            if st.empty:
                continue
            q, _, _, do = _inputs(st.seg.cu_q[-1], heads, kv_heads, dim, dtype, device, seed=r)
            _, k, v, _ = _inputs(st.seg.cu_k[-1], heads, kv_heads, dim, dtype, device, seed=r + 1)
            blocks.append((st, q.detach(), k.detach(), v.detach(), do))
        if counts is not None:
            counts.append(len(blocks))

        def run():
            for st, q, k, v, do in blocks:
                out, lse = kernel.forward(q, k, v, st.seg, st.causal, dim**-0.5, **mods)
                kernel.backward(do, q, k, v, out, lse.to(acc_dtype(q.dtype)), st.seg, st.causal, dim**-0.5, **mods)

        per_rank.append(_timed(run, repeats, sync))
    return max(per_rank), sum(per_rank) / d


def window_table(args):
    """Block calls and block compute per rank with and without the sliding window."""
    from hetsp.attention.kernels import select_kernel

    torch.set_num_threads(1)
    kern = select_kernel("torch_cpu", "cpu")
    print(f"\nSliding window {args.window}: CPU, torch_cpu kernel, fp32, causal; lengths={args.lengths} heads={args.heads} "
          f"kv_heads={args.kv_heads} dim={args.dim}; block kernels only (fwd+bwd), ranks run in turn in one process, "
          f"one thread, median of {args.repeats}")
    print("| ranks | block calls per rank, full | with window | slowest rank full (s) | with window (s) | compute saved |")
    print("|---|---|---|---|---|---|")
    for d in [1] + list(args.ranks):
        runs = {}
        for w in (None, args.window):
            counts: list[int] = []
            t_max, _ = simulated_ring_seconds(args.lengths, d, kern, args.heads, args.kv_heads, args.dim, torch.float32, "cpu", args.repeats, lambda: None, w, counts)
            runs[w] = (counts, t_max)
        (c_full, t_full), (c_win, t_win) = runs[None], runs[args.window]
        print(f"| {d} | {'/'.join(map(str, c_full))} | {'/'.join(map(str, c_win))} | {t_full:.4f} | {t_win:.4f} | {1 - t_win / t_full:.0%} |")


def gpu_table(args, device="cuda", dtype=torch.bfloat16, kernel_names=None):
    """The GPU table (`device`/`kernel_names` other than the defaults only to check this code on CPU)."""
    import torch.nn.functional as F

    from hetsp.attention.kernels import select_kernel
    from hetsp.attention.kernels.base import Segments

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU check run)"
    lengths, heads, kv, dim = args.gpu_lengths, args.heads, args.kv_heads, args.dim
    flops = _attn_flops(lengths, heads, dim)
    print(f"\nGPU {card}, {dtype}, causal; lengths={lengths} heads={heads} kv_heads={kv} dim={dim}")
    print("| what | fwd+bwd (ms) | TFLOP/s |")
    print("|---|---|---|")
    q, k, v, do = _inputs(sum(lengths), heads, kv, dim, dtype, device, 0)

    def sdpa():
        start = 0
        for s in lengths:
            sl = slice(start, start + s)
            o = F.scaled_dot_product_attention(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
            o.backward(do[sl].transpose(0, 1)[None])
            start += s

    t = _timed(sdpa, args.repeats, sync)
    print(f"| torch SDPA, full sequences | {t * 1e3:.2f} | {flops / t / 1e12:.1f} |")
    cu = [0]
    for s in lengths:
        cu.append(cu[-1] + s)
    seg = Segments(tuple(cu), tuple(cu))
    names = kernel_names or ["triton"] + (["flash_attn"] if _has_flash() else [])
    for name in names:
        kern = select_kernel(name, device)

        def local():
            out, lse = kern.forward(q.detach(), k.detach(), v.detach(), seg, True, dim**-0.5)
            kern.backward(do, q.detach(), k.detach(), v.detach(), out, lse, seg, True, dim**-0.5)

        t = _timed(local, args.repeats, sync)
        print(f"| {name} block kernel, full sequences | {t * 1e3:.2f} | {flops / t / 1e12:.1f} |")
        for d in args.gpu_ranks:
            t_max, t_mean = simulated_ring_seconds(lengths, d, kern, heads, kv, dim, dtype, device, args.repeats, sync)
            print(f"| ring on {d} simulated ranks ({name}), slowest rank; balance {t_mean / t_max:.0%} | {t_max * 1e3:.2f} | {flops / d / t_max / 1e12:.1f} per rank |")


def _has_flash():
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gpu-lengths", type=int, nargs="+", default=[32768, 8192, 4096, 1024, 1024])
    p.add_argument("--gpu-ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU table")
    p.add_argument("--window", type=int, default=None, help="also tabulate a sliding window of this many keys")
    args = p.parse_args(argv)
    if not args.no_cpu:
        cpu_table(args)
    if args.window is not None:
        window_table(args)
    if torch.cuda.is_available():
        gpu_table(args)
    else:
        print("\nGPU: no CUDA device here; GPU figures not measured.")


if __name__ == "__main__":
    main()
