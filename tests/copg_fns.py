"""Rank functions for the CoPG tests (importable by reference from the rank pool)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hetsp.plan import Plan

from . import step_fns


def reference_paths(examples, batches, plan_seed, live_plan_json, run_dir):
    """Reference log-probs precomputed (twice: the second must come from the cache) and live."""
    from hetsp.attention import register_attention
    from hetsp.config import ClusterConfig, PlannerConfig
    from hetsp.objectives.copg import CoPG
    from hetsp.objectives.reference import live_reference, precompute_reference
    from solver import get_planner

    rank, world = dist.get_rank(), dist.get_world_size()
    model = step_fns.tiny_model(register_attention(), torch.float64)
    obj = CoPG()
    planner = get_planner("random", PlannerConfig(seed=plan_seed), ClusterConfig())

    def plan_for(batch):
        return planner.plan([len(e.tokens) for e in batch], world, obj.bundles(batch))

    dev = torch.device("cpu")
    pre, cached1 = precompute_reference(model, examples, batches, plan_for, run_dir, rank, world, dev, obj, "reference")
    again, cached2 = precompute_reference(model, examples, batches, plan_for, run_dir, rank, world, dev, obj, "reference")
    live = live_reference(model, Plan.from_json(live_plan_json), examples, rank, world, dev, obj, "reference")
    if rank:
        return None
    return [e.ref_logp for e in pre], cached1, cached2, [e.ref_logp for e in again], [e.ref_logp for e in live]


def lockstep_sampling(prompts_by_rank, k, max_new, zero_stage):
    """Each rank samples for its own prompts inside a DeepSpeed engine (ZeRO-`zero_stage`)."""
    from hetsp.attention import register_attention

    from .generation_fns import sample_in_engine

    return sample_in_engine(step_fns.tiny_model(register_attention(), torch.float32), prompts_by_rank, k, max_new, zero_stage)


def diverse_beams_in_engine(spreads, num_beams, num_groups, diversity, max_new, eos, zero_stage):
    """`generation_fns.diverse_beams_in_engine` with the step tests' tiny Llama (fp32, ring attention)."""
    from hetsp.attention import register_attention

    from .generation_fns import diverse_beams_in_engine as run

    return run(step_fns.tiny_model(register_attention(), torch.float32), spreads, num_beams, num_groups, diversity,
               max_new, eos, zero_stage)


def run_train_recording_rounds(cfg_dict: dict):
    """`hetsp.train.train` on every rank (under ZeRO-3 every forward gathers every parameter:
    `generation_fns.every_parameter_gathered`), recording each call of `online.sample_scored`
    (sampling rounds and held-out evaluations): rank 0 returns the metrics records and, per call, its
    decoding, the policy's parameters at that moment (gathered under ZeRO-3) and the scored
    completions."""
    import json
    from pathlib import Path

    import deepspeed

    from hetsp.config import config_from_dict
    from hetsp.objectives import online

    from .checkpoint_fns import _ds_env
    from .generation_fns import every_parameter_gathered

    _ds_env()
    cfg = config_from_dict(cfg_dict)
    calls = []
    original = online.sample_scored

    def recording(objective, ctx, prompts, texts, seed, names=None, decoding="sample"):
        params = {}
        for name, p in ctx.engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=cfg.train.zero_stage == 3):
                params[name] = p.detach().clone()
        scored = original(objective, ctx, prompts, texts, seed, names, decoding)
        calls.append((decoding, params, [(e.tokens, e.prompt_len, e.bundle) for e in scored]))
        return scored

    online.sample_scored = recording
    try:
        from hetsp.train import train

        with every_parameter_gathered():
            train(cfg, False)
    finally:
        online.sample_scored = original
    if dist.get_rank() != 0:
        return None
    path = Path(cfg.run.output_dir) / cfg.run.name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()], calls


def length_reward(prompt, completion):
    """A reward for online CoPG tests: longer completions score higher."""
    return len(completion) / 10


def hybrid_live_reference(examples, batches, plan_seed, live_plan_json, run_dir, model_kwargs):
    """On the hybrid model (fp64, sequence-parallel SSM layers): reference log-probs precomputed
    from the policy and live from its frozen copy, and the step-0 KL estimate of the policy
    against the live reference (both under the live plan)."""
    from types import SimpleNamespace

    from hetsp.attention import register_attention
    from hetsp.config import ClusterConfig, PlannerConfig
    from hetsp.executor import PlainEngine, run_plan
    from hetsp.objectives.copg import CoPG, frozen_reference
    from hetsp.objectives.reference import live_reference, precompute_reference
    from hetsp.ssm_parallel import parallelize
    from solver import get_planner

    from . import ssm_fns

    rank, world = dist.get_rank(), dist.get_world_size()
    model = parallelize(ssm_fns._build("hybrid", model_kwargs, register_attention(), 1234).to(torch.float64))
    obj = CoPG()
    planner = get_planner("random", PlannerConfig(seed=plan_seed), ClusterConfig())

    def plan_for(batch):
        return planner.plan([len(e.tokens) for e in batch], world, obj.bundles(batch))

    dev = torch.device("cpu")
    frozen = frozen_reference(SimpleNamespace(module=model))
    pre, _ = precompute_reference(model, examples, batches, plan_for, run_dir, rank, world, dev, obj, "reference")
    plan = Plan.from_json(live_plan_json)
    live = live_reference(frozen, plan, examples, rank, world, dev, obj, "reference")
    model.train()
    res = run_plan(PlainEngine(model), plan, live, rank, world, dev, obj, "reference")
    kl = CoPG.finish_metrics(res.metrics)["kl"]
    return [e.ref_logp for e in pre], [e.ref_logp for e in live], kl


def char_sum_reward(prompt, completion):
    """A reward for tests in [0, 1] that tells almost any two different completions apart."""
    return sum(map(ord, completion)) % 11 / 10


def ascii_fraction_reward(prompt, completion):
    """A reward a policy can learn in a few online steps: the fraction of the completion's
    characters below 128 (a random byte model draws about half of its bytes there)."""
    return sum(ord(c) < 128 for c in completion) / max(1, len(completion))
