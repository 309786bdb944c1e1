"""`--dry-run`: model size, per-rank memory estimate and the plans of the first batches.

Builds the model on the meta device (no memory, no GPU), so a 7B config can
be checked on a laptop.
"""

from __future__ import annotations

from typing import Any

from hetsp.config import Config

GIB = 1024**3


def model_state_bytes_per_rank(num_params: int, zero_stage: int, world_size: int, bf16: bool) -> float:
    """Weights, gradients and AdamW states per rank under ZeRO-`zero_stage`."""
    weights = 2 if bf16 else 4
    grads = 2 if bf16 else 4
    optim = 12 if bf16 else 8  # fp32 master copy (bf16 only) + two fp32 moments
    n = max(1, world_size)
    if zero_stage >= 3:
        per_param = (weights + grads + optim) / n
    elif zero_stage == 2:
        per_param = weights + (grads + optim) / n
    else:
        per_param = weights + grads + optim / n
    return num_params * per_param


def activation_bytes_per_token(hf_config: Any, bf16: bool, checkpointing: bool) -> float:
    """Rough activation memory of one token (Korthikanti et al.: about 34 h bytes per layer in
    16-bit with a fused attention kernel; only the layer inputs are kept with checkpointing), plus fp32 logits."""
    h = hf_config.hidden_size
    layers = hf_config.num_hidden_layers
    scale = 1 if bf16 else 2
    per_layer = 34 * h * scale
    body = (2 * h * scale * layers + per_layer) if checkpointing else per_layer * layers
    return body + 4 * hf_config.vocab_size


def dry_run(cfg: Config, world_size: int) -> int:
    from hetsp.model_registry import build_hf_config, build_model
    from hetsp.objectives import get_objective
    from hetsp.planning import make_planner

    bf16 = cfg.train.dtype == "bf16" or cfg.train.dtype == "auto" and cfg.cluster.peak_tflops > 0
    objective = get_objective(cfg.train.objective, cfg.objective)
    data = objective.build_data(cfg, cfg.run.seed)
    model = build_model(cfg.model, data.vocab_size, device="meta")
    num_params = sum(p.numel() for p in model.parameters())
    hf_cfg = build_hf_config(cfg.model, data.vocab_size)
    states = model_state_bytes_per_rank(num_params, cfg.train.zero_stage, world_size, bf16)
    act_tok = activation_bytes_per_token(hf_cfg, bf16, cfg.train.activation_checkpointing)
    acts = act_tok * cfg.cluster.tokens_per_rank
    print(f"model        {cfg.model.family}: {num_params:,} parameters ({num_params / 1e9:.3f} B)")
    print(f"world        {world_size} ranks, ZeRO-{cfg.train.zero_stage}, {'bf16' if bf16 else 'fp32'}")
    print(f"memory/rank  model states {states / GIB:.2f} GiB + activations {acts / GIB:.2f} GiB "
          f"({act_tok / 2**20:.2f} MiB/token x {cfg.cluster.tokens_per_rank} tokens) = {(states + acts) / GIB:.2f} GiB")
    if cfg.cluster.memory_per_rank_gb and (states + acts) / GIB > cfg.cluster.memory_per_rank_gb:
        print(f"WARNING      estimate exceeds cluster.memory_per_rank_gb={cfg.cluster.memory_per_rank_gb}")
    print(f"data         {', '.join(f'{k}={v}' for k, v in data.stats.items())}")
    planner = make_planner(cfg, data.vocab_size)
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
