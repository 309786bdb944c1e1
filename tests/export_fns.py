"""Rank functions for tests/test_export.py: train a tiny Llama one step under DeepSpeed and save it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

TINY_LLAMA = dict(family="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                  max_position_embeddings=128)
VOCAB_SIZE = 61


def tiny_model_config(tie_word_embeddings: bool = False):
    from hetsp.config import ModelConfig

    return ModelConfig(**TINY_LLAMA, tie_word_embeddings=tie_word_embeddings)


def train_step_and_save(run_dir: str, zero_stage: int, tie_word_embeddings: bool) -> dict[str, torch.Tensor] | None:
    """One optimizer step of a tiny Llama under ZeRO-`zero_stage`, then a checkpoint in run_dir/checkpoints.

    Returns (on rank 0) the engine's full parameters after the step, gathered under ZeRO-3.
    """
    import deepspeed

    from hetsp.model_registry import build_model

    from hetsp.testing import deepspeed_env_for_pool_rank

    rank = dist.get_rank()
    deepspeed_env_for_pool_rank(29571)
    torch.manual_seed(0)
    model = build_model(tiny_model_config(tie_word_embeddings), VOCAB_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": dist.get_world_size(),
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, VOCAB_SIZE, (1, 12), generator=gen)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()

    run = Path(run_dir)
    ckpt = run / "checkpoints"
    tag = "step00000001"
    engine.save_checkpoint(str(ckpt), tag=tag)
    if rank == 0:
        meta = json.dumps({"vocab_size": VOCAB_SIZE, "step": 1, "tag": tag})
        (ckpt / tag / "hetsp_meta.json").write_text(meta)
    dist.barrier()

    params = {}
    for name, p in engine.module.named_parameters():
        if zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                params[name] = p.detach().clone()
        else:
            params[name] = p.detach().clone()
    dist.barrier()
    return params if rank == 0 else None
