"""Start from a checkpoint: `model.init_from` = a local Hugging Face model folder.

The folder holds ``config.json`` and safetensors weights (``model.safetensors``,
or shards listed in ``model.safetensors.index.json``). Its config decides the
family and the shape; a shape field that the hetsp config sets explicitly and
that disagrees is an error naming both values. ``model.max_position_embeddings``
and ``model.rope_scaling`` override the checkpoint's (longer context than it
was trained for); only RoPE types whose frequencies do not depend on the
longest position of a forward call are allowed, since a shard sees only its
own positions.

Weights are copied in tensor by tensor with ``safetensors.safe_open``:

* ZeRO-3: the model is built inside ``deepspeed.zero.Init`` (every parameter is
  partitioned as it is created) and each tensor is read by rank 0 and scattered
  into its partitions with ``GatheredParameters(modifier_rank=0)``, so no rank
  ever holds more than the model's partitions plus one full tensor.
* ZeRO 1/2 and single processes: every rank builds the whole model and copies
  one tensor at a time into it: one copy per rank plus the tensor being read.

A SequenceMatch run from a checkpoint without the `<bkspc>` row builds the model
one token row larger and appends the mean row to each vocabulary tensor as it is
read (``load_pretrained(vocab_size=...)``), so under ZeRO-3 too the row exists
before anything is partitioned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from hetsp.config import Config, ModelConfig, explicit_keys

log = logging.getLogger("hetsp.loading")

# config.json model_type -> hetsp family. An allow-list: ring attention and SSM state passing are
# exact for these; any other model type is refused rather than run approximately.
FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "bamba": "bamba",
    "granitemoehybrid": "granitemoehybrid",
    "hetsp_hybrid": "hybrid",
}
# hetsp ModelConfig field -> transformers config field.
SHAPE_FIELDS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
    "rope_theta": "rope_theta",
}
# RoPE types whose inverse frequencies are fixed by the config. "dynamic" and "longrope" rescale
# from the largest position id of each forward call, which differs between the shards of a group.
EXACT_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _folder(init_from: str) -> Path:
    folder = Path(init_from).expanduser()
    if not folder.is_dir():
        raise ValueError(f"model.init_from = {init_from!r}: no such folder; give a local Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model.init_from = {init_from!r} is not a model folder: it has no config.json "
            "(a Hugging Face model folder holds config.json and model.safetensors)"
        )
    return folder


def weight_files(init_from: str) -> list[Path]:
    """The safetensors files of the folder (one, or every shard its index names), in order."""
    folder = _folder(init_from)
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise ValueError(f"{folder / INDEX_FILE}: empty weight_map")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"{folder / INDEX_FILE} names shards that are not in the folder: {missing}")
        return [folder / n for n in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".safetensors", ".pth"))
    raise ValueError(
        f"model.init_from = {str(folder)!r} has no {SINGLE_FILE} nor {INDEX_FILE} (weight files found: "
        f"{found or 'none'}); save the model with save_pretrained(..., safe_serialization=True)"
    )


def checkpoint_config(init_from: str) -> dict[str, Any]:
    """The folder's config.json as a dict."""
    path = _folder(init_from) / "config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def family_of(config_json: dict[str, Any], where: str) -> str:
    model_type = config_json.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is a family hetsp cannot run exactly (ring attention and SSM "
            f"state passing are implemented for {sorted(FAMILIES)}); convert the model or train it elsewhere"
        )
    return FAMILIES[model_type]


def _checkpoint_value(config_json: dict[str, Any], hf_name: str) -> Any:
    if hf_name == "rope_theta" and "rope_theta" not in config_json:
        return (config_json.get("rope_parameters") or {}).get("rope_theta")
    return config_json.get(hf_name)


def _check_rope_scaling(family: str, rope_scaling: dict[str, Any]) -> None:
    if not rope_scaling:
        return
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if family == "hybrid":
        raise NotImplementedError(
            "model.rope_scaling: the hybrid family computes plain RoPE only; remove model.rope_scaling"
        )
    if rope_type not in EXACT_ROPE_TYPES:
        raise ValueError(
            f"model.rope_scaling.rope_type = {rope_type!r}: hetsp runs {list(EXACT_ROPE_TYPES)} exactly; "
            "'dynamic' and 'longrope' rescale from the longest position of each forward call, which differs "
            "between the shards of a group. Use 'linear', 'yarn' or 'llama3'"
        )


def resolve_model_config(model: ModelConfig) -> ModelConfig:
    """`model` with family and shape taken from the checkpoint (ValueError on any contradiction).

    Without ``init_from`` it is returned unchanged.
    """
    if not model.init_from:
        if model.rope_scaling:
            raise ValueError("model.rope_scaling is only used with model.init_from; set the family's rope options in model.extra")
        return model
    where = str(_folder(model.init_from) / "config.json")
    cj = checkpoint_config(model.init_from)
    family = family_of(cj, where)
    explicit = explicit_keys(model)
    if "family" in explicit and model.family != family:
        raise ValueError(f"model.family = {model.family!r} contradicts the checkpoint's family {family!r} ({where}); remove model.family")
    if model.extra:
        raise ValueError(f"model.extra = {model.extra} is not used with model.init_from ({where} decides the model); remove it")
    values: dict[str, Any] = {}
    for name, hf_name in SHAPE_FIELDS.items():
        value = _checkpoint_value(cj, hf_name)
        if name == "num_kv_heads" and value is None:
            value = cj.get("num_attention_heads")
        if value is None:
            continue
        if name in explicit and getattr(model, name) != value:
            raise ValueError(
                f"model.{name} = {getattr(model, name)!r} contradicts the checkpoint's {hf_name} = {value!r} "
                f"({where}); remove model.{name} or set it to {value!r}"
            )
        values[name] = type(getattr(model, name))(value)
    if "max_position_embeddings" not in explicit and cj.get("max_position_embeddings"):
        values["max_position_embeddings"] = int(cj["max_position_embeddings"])
    _check_rope_scaling(family, model.rope_scaling)
    resolved = dataclasses.replace(model, family=family, **values)
    # Every field now states the model exactly: a run's config.toml rebuilds the same model.
    resolved.__dict__["_explicit_keys"] = frozenset(f.name for f in dataclasses.fields(ModelConfig))
    return resolved


def resolve_tokenizer(tokenizer: str, init_from: str) -> str:
    """``data.tokenizer = "model"``: the checkpoint folder's tokenizer ("bytes" for a hetsp export without one)."""
    if tokenizer != "model":
        return tokenizer
    if not init_from:
        raise ValueError('data.tokenizer = "model" needs model.init_from (the folder whose tokenizer to use)')
    folder = _folder(init_from)
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return str(folder)
    export_info = folder / "hetsp_export.json"
    if export_info.is_file() and json.loads(export_info.read_text()).get("tokenizer") == "bytes":
        return "bytes"
    raise ValueError(
        f'data.tokenizer = "model" but {folder} has no tokenizer files ({", ".join(TOKENIZER_FILES)}); '
        'set data.tokenizer to a tokenizer folder or "bytes"'
    )


def resolve_config(cfg: Config) -> Config:
    """The run's config with the checkpoint's model fields and tokenizer filled in (checked before training)."""
    if cfg.data.tokenizer == "model" or cfg.model.init_from or cfg.model.rope_scaling:
        model = resolve_model_config(cfg.model)
        data = dataclasses.replace(cfg.data, tokenizer=resolve_tokenizer(cfg.data.tokenizer, cfg.model.init_from))
        cfg = dataclasses.replace(cfg, model=model, data=data)
    return cfg


def _import_family(family: str) -> None:
    if family == "hybrid":
        import models  # noqa: F401  registers model_type hetsp_hybrid with transformers


def checkpoint_hf_config(model: ModelConfig) -> Any:
    """The transformers config of the checkpoint, with hetsp's context-length overrides applied."""
    from transformers import AutoConfig

    resolved = resolve_model_config(model)
    _import_family(resolved.family)
    hf_cfg = AutoConfig.from_pretrained(str(_folder(model.init_from)), local_files_only=True)
    hf_cfg.max_position_embeddings = resolved.max_position_embeddings
    if model.rope_scaling:
        params = dict(getattr(hf_cfg, "rope_parameters", None) or {})
        scaling = dict(model.rope_scaling)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        params.update(scaling)
        params.setdefault("rope_theta", resolved.rope_theta)
        if params.get("rope_type") in ("yarn", "llama3"):  # they scale relative to the trained context
            params.setdefault("original_max_position_embeddings", checkpoint_config(model.init_from).get("max_position_embeddings"))
        hf_cfg.rope_parameters = params
        try:
            hf_cfg.validate_rope()
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"model.rope_scaling = {model.rope_scaling}: transformers rejects it ({e})") from None
    return hf_cfg


def num_parameters(model: Any) -> int:
    """Parameters of `model`, counting ZeRO-3 partitioned ones by their full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def vocabulary_rows(model: Any) -> set[int]:
    """ids of the parameters that hold one row per token: the input embedding, the output layer
    and its bias (the rows `hetsp.objectives.sequencematch.add_bkspc_rows` grows)."""
    out = [model.get_input_embeddings(), model.get_output_embeddings()]
    return {id(t) for m in out if m is not None for t in (m.weight, getattr(m, "bias", None)) if t is not None}


def load_weights(model: Any, init_from: str, zero3: bool = False, grow_rows: bool = False) -> None:
    """Copy the folder's safetensors into `model`, one tensor at a time (collective under ZeRO-3).

    Every parameter and persistent buffer must be filled (tied weights once); a tensor of a
    different shape or a name the model lacks is an error. With `grow_rows`, the model has one
    token row more than the checkpoint (the `<bkspc>` row of SequenceMatch): each vocabulary tensor
    (`vocabulary_rows`) is copied with its mean row appended (computed in fp32, as `add_bkspc_rows`
    does on the fp32 model), on the rank that reads the tensor, before it is scattered.
    """
    import torch
    from safetensors import safe_open

    rank = 0
    if zero3:
        import deepspeed
        import torch.distributed as dist

        rank = dist.get_rank()
    params = dict(model.named_parameters(remove_duplicate=False))
    persistent = set(model.state_dict(keep_vars=True)) if not zero3 else None
    buffers = {n: b for n, b in model.named_buffers() if persistent is None or n in persistent}
    filled: set[int] = set()
    growable = vocabulary_rows(model) if grow_rows else set()
    unexpected = []
    for path in weight_files(init_from):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                target = params.get(key)
                if target is None:
                    if key in buffers:
                        with torch.no_grad():
                            buffers[key].copy_(f.get_tensor(key))
                    elif not key.endswith("rotary_emb.inv_freq"):
                        unexpected.append(key)
                    continue
                shape = tuple(getattr(target, "ds_shape", target.shape))
                file_shape = tuple(f.get_slice(key).get_shape())
                grow = id(target) in growable and shape == (file_shape[0] + 1, *file_shape[1:])
                if shape != file_shape and not grow:
                    raise ValueError(f"{path}: tensor {key} has shape {file_shape}, the model expects {shape}")

                def read() -> Any:
                    t = f.get_tensor(key)
                    if not grow:
                        return t
                    t = t.to(torch.float32)
                    return torch.cat([t, t.mean(0, keepdim=True)])

                if zero3 and hasattr(target, "ds_id"):
                    with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                        if rank == 0:
                            with torch.no_grad():
                                target.copy_(read())
                else:
                    with torch.no_grad():
                        target.copy_(read())
                filled.add(id(target))
    if unexpected:
        raise ValueError(f"{init_from}: tensors the model does not have: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    missing = sorted({n for n, p in params.items() if id(p) not in filled})
    if missing:
        raise ValueError(f"{init_from}: the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def load_pretrained(model: ModelConfig, train: Any, world_size: int, device: Any, attn_implementation: str | None,
                    vocab_size: int | None = None) -> Any:
    """The checkpoint's model with its weights, built for the ZeRO stage of `train`.

    `vocab_size` one more than the checkpoint's rows: the model is built with the extra token row
    (SequenceMatch's `<bkspc>`), filled with the mean of the checkpoint's rows while loading
    (`load_weights(grow_rows=True)`), so under ZeRO-3 it is added before the embedding is partitioned.
    """
    from transformers import AutoModelForCausalLM

    from hetsp.engine import deepspeed_config, resolve_dtype

    hf_cfg = checkpoint_hf_config(model)
    grow = vocab_size is not None and vocab_size != hf_cfg.vocab_size
    if grow:
        if vocab_size != hf_cfg.vocab_size + 1:
            raise ValueError(f"{model.init_from} has {hf_cfg.vocab_size} token rows: only one row (<bkspc>) can be "
                             f"added while loading, not {vocab_size - hf_cfg.vocab_size}")
        hf_cfg.vocab_size = vocab_size
    if attn_implementation is not None:
        hf_cfg._attn_implementation = attn_implementation
    zero3 = train.zero_stage == 3
    if zero3:
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing process group
        # Import the model's module (and torch._dynamo, which transformers imports with it) before
        # zero.Init patches tensor construction: importing them inside it fails.
        import torch._dynamo  # noqa: F401

        AutoModelForCausalLM._model_mapping[type(hf_cfg)]
        dtype = resolve_dtype(train, device)
        # The dtype comes from the config (bf16 or fp32): zero.Init's own dtype argument is ignored
        # on accelerators without fp16, where it would fall back to bf16.
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(train, world_size, dtype)):
            net = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn_implementation)
    else:
        net = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn_implementation)
    load_weights(net, model.init_from, zero3=zero3, grow_rows=grow)
    log.info("loaded %s (%s, %.2fM parameters) with ZeRO-%d loading", model.init_from, model.family,
             num_parameters(net) / 1e6, train.zero_stage)
    return net


def check_vocab(model: Any, tokenizer_vocab: int, tokenizer: str) -> None:
    """The tokenizer's ids must all be rows of the model's embedding."""
    rows = model.config.vocab_size
    if tokenizer_vocab > rows:
        raise ValueError(
            f"data.tokenizer {tokenizer!r} has {tokenizer_vocab} ids but the model's embedding has {rows} rows; "
            "use the checkpoint's tokenizer (data.tokenizer = \"model\")"
        )


def build_training_model(cfg: Config, data: Any, world_size: int, device: Any, attn_implementation: str) -> Any:
    """The model a run trains: random or loaded from `model.init_from` (with the `<bkspc>` row added when
    the run's tokenizer has it and the checkpoint does not), LoRA applied (the `<bkspc>` rows trainable
    beside the adapters), SSM layers parallelized."""
    from hetsp.lora import apply_lora, train_bkspc_rows
    from hetsp.model_registry import build_model
    from hetsp.ssm_parallel import parallelize

    bkspc = getattr(data.tokenizer, "bkspc_token_id", None)  # SequenceMatch
    if cfg.model.init_from:
        from hetsp.objectives.sequencematch import bkspc_vocab_size

        # a checkpoint without the <bkspc> row gets it while loading (before ZeRO-3 partitions it)
        vocab = None if bkspc is None else bkspc_vocab_size(data.tokenizer, checkpoint_hf_config(cfg.model).vocab_size)
        net = load_pretrained(cfg.model, cfg.train, world_size, device, attn_implementation, vocab_size=vocab)
        check_vocab(net, data.vocab_size, cfg.data.tokenizer)
    else:
        net = build_model(cfg.model, data.vocab_size, attn_implementation=attn_implementation)
    net = apply_lora(net, cfg.lora)
    if bkspc is not None and cfg.lora.r > 0:
        train_bkspc_rows(net, bkspc)  # the frozen base's <bkspc> rows train beside the adapters
    return parallelize(net)
