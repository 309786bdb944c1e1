"""Fixed cost of a group, and where it goes: a rank program started by the launcher.

    python -m launcher --simulate 4 --module bench.group_overhead configs/default.toml [--set k=v ...]

For each group size d (1 to the world) it runs micro-batches in which world // d
groups of d ranks each hold one sequence of --tokens tokens (the other ranks
idle), as training runs them, plus one micro-batch in which every rank is idle.
Per micro-batch it reports, on the slowest rank: the time (median of --repeats),
the exchanges a rank posts (batched isend/irecv calls, by kind: ring K/V, ring
dK/dV, SSM state gathers and their gradients, convolution halos), the messages
and bytes it sends, and the time it is blocked waiting for them. Counting wraps
`torch.distributed.batch_isend_irecv` in this process only, so it measures any
version of hetsp the same way. Rank 0 prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TAG_KIND = {17: "ring K/V", 18: "ring dK/dV", 41: "state gather", 42: "state gather grad", 43: "halo", 44: "halo grad"}


class Counting:
    """Wraps dist.batch_isend_irecv: counts calls by kind, messages and bytes sent, and time blocked in wait()."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.messages = 0
        self.bytes = 0
        self.blocked_s = 0.0
        self._orig = dist.batch_isend_irecv
        counter = self

        def wrapped(ops):
            kinds = {TAG_KIND.get(getattr(op, "tag", None), f"tag {getattr(op, 'tag', None)}") for op in ops}
            for k in kinds:
                counter.calls[k] += 1
            for op in ops:
                if op.op is dist.isend or getattr(op.op, "__name__", "") == "isend":
                    counter.messages += 1
                    counter.bytes += op.tensor.numel() * op.tensor.element_size()
            works = counter._orig(ops)
            return [_TimedWork(w, counter) for w in works]

        dist.batch_isend_irecv = wrapped

    def reset(self) -> None:
        self.calls.clear()
        self.messages, self.bytes, self.blocked_s = 0, 0, 0.0


class _TimedWork:
    def __init__(self, work, counter: Counting) -> None:
        self._work, self._counter = work, counter

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._counter.blocked_s += time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--tokens", type=int, default=128, help="tokens of each group's sequence")
    p.add_argument("--repeats", type=int, default=5)
    args, _ = p.parse_known_args(argv)

    from hetsp.config import load_config
    from hetsp.executor import run_plan
    from hetsp.loading import resolve_config
    from hetsp.plan import Group, MicroBatch, Plan
    from hetsp.train import build_runtime, init_distributed, setup_logging

    cfg = load_config(args.config, args.overrides)
    init_distributed(cfg.run.dist_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    rt = build_runtime(resolve_config(cfg))
    counting = Counting()
    layers = cfg.model.num_layers

    def timed(plan: Plan, seqs: list[list[int]]) -> dict:
        samples = []
        for k in range(args.repeats + 1):  # the first run warms up
            dist.barrier()
            counting.reset()
            t0 = time.perf_counter()
            run_plan(rt.engine, plan, seqs, rank, world, rt.device, rt.objective, cfg.attention.kernel)
            mine = torch.tensor([time.perf_counter() - t0, counting.blocked_s], dtype=torch.float64)
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            if k:
                samples.append(mine.tolist())
        counts = torch.tensor([sum(counting.calls.values()), counting.messages, counting.bytes], dtype=torch.float64)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        all_kinds = [None] * world
        dist.all_gather_object(all_kinds, dict(counting.calls))
        busiest = max(all_kinds, key=lambda c: sum(c.values()))
        return {
            "time_s": statistics.median(s[0] for s in samples),
            "blocked_s": statistics.median(s[1] for s in samples),
            "exchanges": int(counts[0]),
            "messages": int(counts[1]),
            "bytes": int(counts[2]),
            "by_kind": busiest,
        }

    rows = []
    idle = timed(Plan((2,), (MicroBatch((Group(0, 1, (0,)),)),)), [[1, 2]])  # rank 0: 2 tokens, the rest idle
    idle["degree"] = 0
    rows.append(idle)
    gen = torch.Generator().manual_seed(0)
    for d in range(1, world + 1):
        k = world // d
        seqs = [torch.randint(0, rt.data.vocab_size, (args.tokens,), generator=gen).tolist() for _ in range(k)]
        plan = Plan(tuple(args.tokens for _ in range(k)), (MicroBatch(tuple(Group(j * d, d, (j,)) for j in range(k))),))
        row = timed(plan, seqs)
        row["degree"] = d
        rows.append(row)
    if rank == 0:
        print(f"\nfixed cost of a micro-batch by group size: {world} ranks, world // d groups of d ranks, "
              f"{args.tokens} tokens each, {layers} layers, median of {args.repeats}")
        print("| group size | s per micro-batch | blocked in exchanges (s) | exchanges per rank | per layer | "
              "messages sent | bytes sent | by kind |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            name = "all idle (2 tokens on rank 0)" if r["degree"] == 0 else str(r["degree"])
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["by_kind"].items())) or "-"
            print(f"| {name} | {r['time_s']:.3f} | {r['blocked_s']:.3f} | {r['exchanges']} | "
                  f"{r['exchanges'] / layers:.1f} | {r['messages']} | {r['bytes']:,} | {kinds} |")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
