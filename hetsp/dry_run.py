"""`--dry-run`: model size, per-rank memory estimate and the plans of the first batches.

Builds the model on the meta device (no memory, no GPU), so a 7B config can
be checked on a laptop.
"""

from __future__ import annotations

from typing import Any

from hetsp.config import Config

GIB = 1024**3


def dry_run(cfg: Config, world_size: int) -> int:
    from hetsp.model_registry import build_model
    from hetsp.objectives import get_objective
    from hetsp.overhead import process_overhead
    from hetsp.planning import make_planner

    import torch

    from hetsp.memory import MemoryModel, run_dtype

    on_gpu = torch.cuda.is_available()
    dtype = run_dtype(cfg.train.dtype, on_gpu)
    objective = get_objective(cfg.train.objective, cfg.objective)
    data = objective.build_data(cfg, cfg.run.seed)
    model = build_model(cfg.model, data.vocab_size, device="meta")
    num_params = sum(p.numel() for p in model.parameters())
    # the planner's memory model (hetsp.memory), with the same inputs the planner gets
    mem = MemoryModel.for_run(cfg.model, cfg.model.vocab_size or data.vocab_size, world_size, cfg.train.zero_stage,
                              dtype, cfg.train.activation_checkpointing)
    states = mem.state_bytes_per_rank()
    act_tok = mem.activation_bytes_per_token()
    if cfg.cluster.memory_per_rank_gb > 0:
        tokens = mem.tokens_per_rank(cfg.cluster.memory_per_rank_gb * GIB)
        budget = f"tokens/rank  {tokens:,} fit in cluster.memory_per_rank_gb={cfg.cluster.memory_per_rank_gb}"
    else:
        tokens = cfg.cluster.tokens_per_rank
        budget = f"tokens/rank  {tokens:,} (cluster.tokens_per_rank)"
    acts = act_tok * max(0, tokens)
    print(f"model        {cfg.model.family}: {num_params:,} parameters ({num_params / 1e9:.3f} B); "
          f"the memory model counts {mem.num_params:,.0f} (dense decoder of this shape)")
    print(f"world        {world_size} ranks, ZeRO-{cfg.train.zero_stage}, {dtype}")
    print(budget)
    print(f"memory/rank  model states {states / GIB:.2f} GiB + activations {acts / GIB:.2f} GiB "
          f"({act_tok / 2**20:.2f} MiB/token x {tokens} tokens) = {(states + acts) / GIB:.2f} GiB")
    if cfg.cluster.memory_per_rank_gb and (states + acts) / GIB > cfg.cluster.memory_per_rank_gb:
        print(f"WARNING      estimate exceeds cluster.memory_per_rank_gb={cfg.cluster.memory_per_rank_gb}")
    process = process_overhead(cfg, num_params, dtype == "bf16")
    print(f"process/rank {process.describe()}")
    print(f"total/rank   {(states + acts + process.total) / GIB:.2f} GiB of host memory on CPU "
          "(on GPU, the process terms are host memory and the rest device memory)")
    print(f"data         {', '.join(f'{k}={v}' for k, v in data.stats.items())}")
    planner = make_planner(cfg, data.vocab_size, on_gpu)
    if not hasattr(data, "train_batch"):
        print("\nbatches are sampled from the policy during training (online): no plans to show")
        return 0
    for step in range(min(3, cfg.train.steps)):
        batch = data.train_batch(step)
        plan = planner.plan([len(s) for s in batch], world_size, objective.bundles(batch))
        print(f"\nstep {step}: {len(batch)} sequences, {sum(len(s) for s in batch):,} tokens, "
              f"{plan.num_micro_batches} micro-batches, groups {plan.group_sizes()}, "
              f"planner {plan.meta.get('planner')} {plan.meta.get('status', '')} in {plan.meta.get('solve_s', 0):.3f}s")
        for m, mb in enumerate(plan.micro_batches):
            parts = [f"[{g.start}:{g.stop}) {len(g.seqs)} seq {g.num_tokens(plan.lengths):,} tok" for g in mb.groups if g.seqs]
            print(f"  mb {m}: " + "; ".join(parts))
    return 0
