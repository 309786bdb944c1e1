"""Rank functions for the live CoPG reference under ZeRO-3 (importable by reference from the rank pool)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hetsp.plan import Plan

from . import step_fns


def policy_model(family: str, model_kwargs: dict | None, attn: str | None = None):
    """The fp32 policy every process builds alike: the tiny stock Llama, or the hybrid model
    (sequence-parallel SSM layers) with `model_kwargs`; ring attention unless `attn` is given."""
    from hetsp.attention import register_attention
    from hetsp.ssm_parallel import parallelize

    from . import ssm_fns

    attn = attn or register_attention()
    if family == "llama":
        return step_fns.tiny_model(attn, torch.float32)
    return parallelize(ssm_fns._build(family, model_kwargs, attn, 1234))


def zero3_engine(model, world: int):
    """`model` in a ZeRO-3 engine with AdamW, fp32; small parameters are not kept gathered
    (persistence threshold 0), so a rank holds only its partitions between forwards."""
    import deepspeed

    from hetsp.config import TrainConfig
    from hetsp.engine import deepspeed_config

    config = deepspeed_config(TrainConfig(zero_stage=3, dtype="fp32"), world, torch.float32)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _gathered_numel(module) -> int:
    """Elements of `module`'s parameters held in full on this rank right now."""
    return sum(p.data.numel() for p in module.parameters())


def live_reference_zero3(examples, batches, plan_seed, live_plan_json, run_dir, family, model_kwargs):
    """Under ZeRO-3 on every rank: reference log-probs precomputed from the policy and live from
    its partitioned frozen copy, the step-0 KL estimate of the policy against the live reference
    (both under the live plan), the live log-probs and the KL estimate again after one update of
    the policy, and per rank the copy's and the policy's partition sizes (elements
    stored, full elements) and the elements either holds in full after the forwards."""
    from hetsp.config import ClusterConfig, PlannerConfig
    from hetsp.executor import run_plan
    from hetsp.objectives.copg import CoPG, frozen_reference
    from hetsp.objectives.reference import live_reference, precompute_reference
    from hetsp.objectives.zero3_reference import partition_numel
    from solver import get_planner

    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("LOCAL_RANK", str(rank))
    engine = zero3_engine(policy_model(family, model_kwargs), world)
    frozen = frozen_reference(engine)
    assert not any(p.requires_grad for p in frozen.module.parameters()) and not frozen.module.training
    obj = CoPG()
    planner = get_planner("random", PlannerConfig(seed=plan_seed), ClusterConfig())

    def plan_for(batch):
        return planner.plan([len(e.tokens) for e in batch], world, obj.bundles(batch))

    dev = torch.device("cpu")
    pre, _ = precompute_reference(engine.module, examples, batches, plan_for, run_dir, rank, world, dev, obj, "reference")
    plan = Plan.from_json(live_plan_json)
    live = live_reference(frozen, plan, examples, rank, world, dev, obj, "reference")
    res = run_plan(engine, plan, live, rank, world, dev, obj, "reference", train=False)
    kl = CoPG.finish_metrics(res.metrics)["kl"]
    res = run_plan(engine, plan, live, rank, world, dev, obj, "reference")  # one update of the policy
    engine.step()
    after = live_reference(frozen, plan, examples, rank, world, dev, obj, "reference")
    moved = run_plan(engine, plan, after, rank, world, dev, obj, "reference", train=False)
    kl_after = CoPG.finish_metrics(moved.metrics)["kl"]
    sizes = {"copy": partition_numel(frozen.module), "policy": partition_numel(engine.module),
             "copy_gathered": _gathered_numel(frozen.module), "policy_gathered": _gathered_numel(engine.module)}
    frozen.destroy()
    engine.destroy()
    return [e.ref_logp for e in pre], [e.ref_logp for e in live], kl, [e.ref_logp for e in after], kl_after, sizes
