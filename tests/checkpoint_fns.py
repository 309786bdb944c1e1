"""Tiny Hugging Face checkpoints and tokenizers written in the test, and rank functions that load them."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from hetsp.config import config_from_dict
from hetsp.plan import Plan

TINY_LLAMA = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tiny_llama(folder: str | Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    """A random tiny LlamaForCausalLM saved with save_pretrained (safetensors; sharded when max_shard_size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY_LLAMA, **overrides)))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return Path(folder)


def save_tiny_tokenizer(folder: str | Path) -> Path:
    """A byte-level BPE tokenizer without merges (259 ids + 4 chat tokens) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return Path(folder)


def _ds_env() -> None:
    from hetsp.testing import deepspeed_env_for_pool_rank

    deepspeed_env_for_pool_rank(29581)


def loaded_parameters(folder: str, zero_stage: int, vocab_size: int | None = None):
    """Every parameter of the checkpoint as loaded for ZeRO-`zero_stage` (gathered on rank 0), with
    `vocab_size` rows when given (`load_pretrained`'s added row)."""
    import deepspeed

    from hetsp.loading import load_pretrained

    _ds_env()
    cfg = config_from_dict({"model": {"init_from": folder}, "train": {"zero_stage": zero_stage, "dtype": "fp32"}})
    model = load_pretrained(cfg.model, cfg.train, dist.get_world_size(), torch.device("cpu"), None, vocab_size=vocab_size)
    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=zero_stage == 3):
            out[name] = p.detach().clone()
    return out if dist.get_rank() == 0 else None


def plain_model(cfg_dict: dict, dtype=torch.float64, attn: str | None = None):
    """The run's model built exactly as training builds it (LoRA included), as a plain module in `dtype`
    (ring attention unless `attn` names a stock one). In fp64, RMSNorm computes in fp64 as in step_fns."""
    import types

    from hetsp.attention import register_attention
    from hetsp.data import load_tokenizer
    from hetsp.loading import build_training_model, resolve_config

    from .step_fns import _rmsnorm_in_input_dtype

    cfg = resolve_config(config_from_dict(cfg_dict))
    vocab = load_tokenizer(cfg.data.tokenizer).vocab_size

    class _Data:
        vocab_size = vocab
        tokenizer = None  # no <bkspc> row to add

    torch.manual_seed(7)
    model = build_training_model(cfg, _Data, 1, torch.device("cpu"), attn or register_attention())
    model = model.to(dtype)
    if dtype == torch.float64:
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.forward = types.MethodType(_rmsnorm_in_input_dtype, m)
    return model


def plan_loss_and_grads(cfg_dict: dict, sequences, plan_json: str, dtype=torch.float64):
    """Step loss and data-parallel-averaged gradients of the trainable parameters under `plan_json`."""
    from hetsp.executor import PlainEngine, run_plan
    from hetsp.objectives.lm import LanguageModeling

    rank, world = dist.get_rank(), dist.get_world_size()
    model = plain_model(cfg_dict, dtype)
    model.train()
    plan = Plan.from_json(plan_json).validate(world)
    res = run_plan(PlainEngine(model), plan, sequences, rank, world, torch.device("cpu"), LanguageModeling(), "reference")
    loss = torch.tensor([res.loss_sum], dtype=torch.float64)
    dist.all_reduce(loss)
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            grads[name] = g / world
    return (loss.item() / res.num_units, grads) if rank == 0 else None


def run_training(cfg_dict: dict, resume: bool = False):
    """`hetsp.train.train` on every rank; rank 0 returns (metrics records, trainable and frozen parameters)."""
    import json

    import deepspeed

    from hetsp import train as train_mod

    _ds_env()
    cfg = config_from_dict(cfg_dict)
    captured = {}
    build = train_mod.build_runtime

    def keep(c):
        rt = build(c)
        captured["engine"] = rt.engine
        return rt

    train_mod.build_runtime = keep
    try:
        train_mod.train(cfg, resume)
    finally:
        train_mod.build_runtime = build
    params = {}
    for name, p in captured["engine"].module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=cfg.train.zero_stage == 3):
            params[name] = (p.detach().clone(), p.requires_grad)
    captured["engine"].destroy()
    if dist.get_rank() != 0:
        return None
    path = Path(cfg.run.output_dir) / cfg.run.name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()], params


def plan_logits(cfg_dict: dict, sequences, plan_json: str):
    """Logits of every token under `plan_json` (fp64, ring attention), assembled on rank 0 by sequence."""
    from hetsp.attention import make_shard_context
    from hetsp.layout import shard_layout

    rank, world = dist.get_rank(), dist.get_world_size()
    model = plain_model(cfg_dict, torch.float64)
    plan = Plan.from_json(plan_json).validate(world)
    out = {}
    with torch.no_grad():
        for mb in plan.micro_batches:
            group = mb.group_of(rank)
            pieces = []
            if group is not None and group.seqs:
                lengths = [plan.lengths[s] for s in group.seqs]
                ids = torch.tensor([t for s in group.seqs for t in sequences[s]])
                layout = shard_layout(lengths, group.size, rank - group.start)
                index = torch.tensor(layout.token_index, dtype=torch.long)
                shard = make_shard_context(lengths, group.start, group.size, rank, "cpu", kernel="reference")
                logits = model(input_ids=ids[index][None], position_ids=shard.positions[None], hetsp_shard=shard).logits[0]
                pieces = [(group.seqs, lengths, index, logits)]
            gathered = [None] * world
            dist.all_gather_object(gathered, pieces)
            for part in gathered:
                for seqs, lengths, index, logits in part:
                    starts = [sum(lengths[:i]) for i in range(len(lengths))]
                    for s, start, n in zip(seqs, starts, lengths):
                        full = out.setdefault(s, torch.zeros(n, logits.shape[-1], dtype=logits.dtype))
                        sel = (index >= start) & (index < start + n)
                        full[index[sel] - start] = logits[sel]
    return out if rank == 0 else None
