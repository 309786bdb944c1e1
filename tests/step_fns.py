"""Rank functions for whole-step tests (importable by reference from the rank pool)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hetsp.config import ModelConfig
from hetsp.plan import Plan

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, max_position_embeddings=512)
VOCAB = 37


def _rmsnorm_in_input_dtype(self, x):
    variance = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


def tiny_model(attn: str, dtype=torch.float32, model_cfg: ModelConfig = TINY):
    """The same random tiny Llama in every process. In fp64, RMSNorm computes in fp64
    (transformers computes it in fp32, which would cap every fp64 comparison at fp32 rounding)."""
    import types

    from hetsp.model_registry import build_model

    torch.manual_seed(1234)
    model = build_model(model_cfg, VOCAB, attn_implementation=attn).to(dtype)
    if dtype == torch.float64:
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.forward = types.MethodType(_rmsnorm_in_input_dtype, m)
    return model


def plan_step(cases, kernel="auto", dtype=torch.float64, checkpointing=False, model_cfg: ModelConfig = TINY, objective=None):
    """For each (sequences, plan_json): global loss and data-parallel-averaged grads (rank 0 returns them).
    `objective`: language modelling when None."""
    from hetsp.attention import register_attention
    from hetsp.executor import PlainEngine, run_plan
    from hetsp.objectives.lm import LanguageModeling

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for sequences, plan_json in cases:
        model = tiny_model(register_attention(), dtype, model_cfg)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        plan = Plan.from_json(plan_json).validate(world)
        res = run_plan(PlainEngine(model), plan, sequences, rank, world, torch.device("cpu"), objective or LanguageModeling(), kernel)
        loss = torch.tensor([res.loss_sum], dtype=torch.float64)
        dist.all_reduce(loss)
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            grads[name] = g / world
        out.append((loss.item() / res.num_units, grads) if rank == 0 else None)
    return out


def deepspeed_step(sequences, plan_json, zero_stage, steps=1, objective=None, checkpointing=False):
    """Parameters after `steps` DeepSpeed steps of the same batch under `plan_json` (gathered, on rank 0)."""
    import deepspeed

    from hetsp.attention import register_attention
    from hetsp.config import TrainConfig
    from hetsp.engine import build_engine
    from hetsp.executor import run_plan
    from hetsp.objectives.lm import LanguageModeling

    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("LOCAL_RANK", str(rank))
    train = TrainConfig(steps=steps, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0, zero_stage=zero_stage, dtype="fp32", adam_eps=1e-2)
    model = tiny_model(register_attention(), torch.float32)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    engine = build_engine(model, train, world, torch.device("cpu"))
    plan = Plan.from_json(plan_json)
    losses = []
    for _ in range(steps):
        res = run_plan(engine, plan, sequences, rank, world, torch.device("cpu"), objective or LanguageModeling())
        engine.step()
        t = torch.tensor([res.loss_sum], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / res.num_units)
    params = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=zero_stage == 3):
            params[name] = p.detach().clone()
    engine.destroy()
    return (losses, params) if rank == 0 else None
