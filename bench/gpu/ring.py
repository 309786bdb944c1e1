"""Step `ring`: ring attention over 2 and 4 simulated ranks sharing one GPU (gloo, messages
staged through host memory), exact against one process, and its time against one process.

Every rank builds the same packed batch from a seed, takes its zigzag shard, runs ring
attention forward and backward on cuda:0 with the Triton kernel, and returns its shard of
out/dq/dk/dv (fp32, IEEE dots: exactness) and its median fwd+bwd seconds (bf16). The step's
own process computes the one-process result (a group of one) of the same batch and kernel.
The ranks share one GPU, so the ring's time measures its overhead (exchanges through host
memory, more and smaller kernel launches), not a speed-up.
"""

from __future__ import annotations

import statistics
import time

import torch

from .common import TOLERANCES, closeness, packed_inputs

LENGTHS_FULL = (12000, 3001, 777, 1)
LENGTHS_QUICK = (3000, 777, 1)
SHAPE = dict(heads=8, kv_heads=2, dim=128)


def _fwd_bwd(lengths, group_size, rank, dtype, device, kernel="triton", shape=SHAPE, causal=True):
    from hetsp.attention import make_shard_context, ring_attention

    q, k, v, do = packed_inputs(lengths, shape["heads"], shape["kv_heads"], shape["dim"], dtype, device, seed=0)
    ctx = make_shard_context(list(lengths), 0, group_size, rank, device, kernel=kernel)
    idx = torch.tensor(ctx.layout.token_index, dtype=torch.long, device=device)
    ql, kl, vl = (t.index_select(0, idx).requires_grad_(True) for t in (q, k, v))
    dol = do.index_select(0, idx)

    def step():
        out = ring_attention(ql, kl, vl, ctx, causal)
        return (out, *torch.autograd.grad(out, (ql, kl, vl), dol))

    return step, idx


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(step, repeats, device, barrier=None) -> float:
    step()
    times = []
    for _ in range(repeats):
        _sync(device)
        if barrier:
            barrier()
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rank_run(lengths, repeats: int, device="cuda:0", kernel="triton", shape=SHAPE, timed_dtype="bfloat16"):
    """On every rank of a gloo pool (all on one device): fp32 shard results and timed seconds."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    step, idx = _fwd_bwd(lengths, world, rank, torch.float32, device, kernel, shape)
    shard = [t.detach().cpu() for t in step()]
    timed, _ = _fwd_bwd(lengths, world, rank, getattr(torch, timed_dtype), device, kernel, shape)
    return dict(idx=idx.cpu(), shard=shard, seconds=_median_seconds(timed, repeats, device, dist.barrier))


def one_process(lengths, repeats: int, device="cuda:0", kernel="triton", shape=SHAPE, timed_dtype="bfloat16"):
    """The same batch as a group of one: fp32 (out, dq, dk, dv) and timed seconds."""
    device = torch.device(device)
    step, _ = _fwd_bwd(lengths, 1, 0, torch.float32, device, kernel, shape)
    full = [t.detach() for t in step()]
    timed, _ = _fwd_bwd(lengths, 1, 0, getattr(torch, timed_dtype), device, kernel, shape)
    return full, _median_seconds(timed, repeats, device)


def worst_error(per_rank, full) -> float:
    """Largest |err|/tol over every rank's shard of out, dq, dk, dv against the one-process result."""
    errs = []
    for r in per_rank:
        idx = r["idx"].to(full[0].device)
        # out and dq rows belong to the shard's queries, dk and dv rows to its keys (the same tokens)
        errs += [closeness(s.to(full[0].device), f.index_select(0, idx), TOLERANCES[torch.float32])
                 for s, f in zip(r["shard"], full)]
    return max(errs)


def run(rec, quick: bool = False) -> None:
    from hetsp.testing import RankPool

    lengths = LENGTHS_QUICK if quick else LENGTHS_FULL
    repeats = 3 if quick else 5
    full, t_one = one_process(lengths, repeats)
    worst, parts, ok_all = 0.0, [], True
    for world in (2, 4):
        pool = RankPool(world)
        try:
            per_rank = pool.run(rank_run, lengths, repeats, timeout=240)
        finally:
            pool.close()
        err = worst_error(per_rank, full)
        t_ring = max(r["seconds"] for r in per_rank)
        ok = err <= 1.0
        ok_all &= ok
        worst = max(worst, err)
        rec.row("ring on one GPU (gloo, host staging)", ranks=world, tokens=sum(lengths), exact_fp32=ok,
                err_over_tol=round(err, 3), ring_ms=t_ring * 1e3, one_process_ms=t_one * 1e3, ratio=t_ring / t_one)
        parts.append(f"{world} ranks {t_ring * 1e3:.1f} ms")
    rec.finish("ok" if ok_all else "fail",
               f"ring {'exact' if ok_all else 'NOT exact'} vs one process (worst |err|/tol {worst:.2f}, fp32); "
               f"bf16 fwd+bwd {', '.join(parts)} vs one process {t_one * 1e3:.1f} ms ({sum(lengths)} tokens)")
