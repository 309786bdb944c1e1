"""LoRA through `peft`: ``[lora]`` r, alpha, dropout, target_modules.

The adapted model keeps the base model's modules (peft wraps the targeted
linear layers in place), so ring attention (the attention implementation in
the model's config) and SSM state passing (`hetsp.ssm_parallel.parallelize`,
applied after this) find their layers as before. Only adapter parameters
require gradients (and, for SequenceMatch, the `<bkspc>` rows: `train_bkspc_rows`);
the optimizer and checkpoints see only them.

Why not peft's own ``trainable_token_indices`` in training: its ZeRO-3 set-up
gathers the rows on a CUDA device only, and its forward reads the partitioned
embedding weight outside the embedding's own forward, where ZeRO-3 does not
gather it. `train_bkspc_rows` keeps each row a parameter of its own layer,
gathered with it; the export converts the rows to peft's format for adapters.
"""

from __future__ import annotations

import logging
from typing import Any

from hetsp.config import LoraConfig

log = logging.getLogger("hetsp.lora")


def lora_enabled(lora: LoraConfig) -> bool:
    return lora.r > 0


def check_lora_config(lora: LoraConfig) -> None:
    if lora.r < 0:
        raise ValueError(f"lora.r = {lora.r}: must be >= 1 (or 0 to train every parameter)")
    if lora_enabled(lora):
        if not lora.target_modules:
            raise ValueError("lora.target_modules is empty; name the linear layers to adapt (e.g. [\"q_proj\", \"v_proj\"])")
        if not 0.0 <= lora.dropout < 1.0:
            raise ValueError(f"lora.dropout = {lora.dropout}: must be in [0, 1)")


def peft_config(lora: LoraConfig, **extra: Any) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM", **extra)


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """`model` with LoRA adapters on `lora.target_modules` (unchanged when ``lora.r == 0``)."""
    check_lora_config(lora)
    if not lora_enabled(lora):
        return model
    import torch
    from peft import get_peft_model

    linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in lora.target_modules if t not in linear_names]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} name no linear layer of {type(model).__name__}; "
            f"its linear layers are {sorted(linear_names)}"
        )
    adapted = get_peft_model(model, peft_config(lora))
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in adapted.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %s: %.3fM trainable parameters", lora.r, lora.alpha,
             ",".join(lora.target_modules), trainable / 1e6)
    return adapted


# The <bkspc> rows of SequenceMatch under LoRA: a parameter of this name on the input embedding and
# on the output layer (the same parameter when they are tied), trained while the base stays frozen.
BKSPC_ROW = "bkspc_row"


def _row_modules(model: Any) -> tuple[Any, Any]:
    """(input embedding, output layer) of `model` (a peft model or a plain one), checked to be plain
    torch layers: a LoRA-adapted embedding or output layer would add its own delta to the row."""
    import torch

    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    for m, kind in ((emb, torch.nn.Embedding), (out, torch.nn.Linear)):
        if type(m) is not kind:
            raise NotImplementedError(
                f"sequencematch with LoRA trains the <bkspc> rows of a plain {kind.__name__}, but the model's layer is "
                f"{type(m).__name__}; remove the embedding and output layers from lora.target_modules")
    if out.bias is not None:
        raise NotImplementedError("sequencematch with LoRA: the output layer has a bias, whose <bkspc> entry would stay "
                                  "frozen; use lora.r = 0")
    return emb, out


def _embedding_row(module: Any, args: tuple, output: Any) -> Any:
    import torch

    ids = args[0]
    return torch.where((ids == module.bkspc_token_id)[..., None], getattr(module, BKSPC_ROW).to(output.dtype), output)


def _output_row(module: Any, args: tuple, output: Any) -> Any:
    import torch

    # in place: the logits are (tokens x vocabulary), and linear's backward does not read its output
    row = getattr(module, BKSPC_ROW)[None]
    output[..., module.bkspc_token_id] = torch.nn.functional.linear(args[0], row)[..., 0].to(output.dtype)
    return output


def train_bkspc_rows(model: Any, bkspc_id: int) -> Any:
    """Make the `<bkspc>` embedding row and output row of a LoRA model trainable, the rest of the base
    staying frozen: each layer gets a parameter `bkspc_row` (the shared one when the model ties them),
    initialised from its row, and a forward hook that puts it in place of the frozen row (the
    embedding of every `<bkspc>` id; the `<bkspc>` logit = hidden . row). The rows are ordinary
    parameters of the layer, so ZeRO 1/2/3 shard, gather and checkpoint them with the adapters;
    `merge_bkspc_rows` writes them into the weights. The hooks are not peft adapters: they stay on
    inside `disable_adapter()` (objectives with a `<bkspc>` row do not use a base-model reference)."""
    import torch

    emb, out = _row_modules(model)
    tied = out.weight is emb.weight
    for m in (emb,) if tied else (emb, out):
        weight = m.weight
        if hasattr(weight, "ds_id"):  # ZeRO-3 partitioned: gather the weight to read its row
            import deepspeed

            with deepspeed.zero.GatheredParameters([weight]):
                row = weight[bkspc_id].detach().clone()
        else:
            row = weight[bkspc_id].detach().clone()
        m.register_parameter(BKSPC_ROW, torch.nn.Parameter(row.to(weight.dtype)))
    if tied:
        out.register_parameter(BKSPC_ROW, getattr(emb, BKSPC_ROW))
    for m, hook in ((emb, _embedding_row), (out, _output_row)):
        m.bkspc_token_id = bkspc_id
        m._bkspc_hook = m.register_forward_hook(hook, prepend=True)
    return model


def merge_bkspc_rows(model: Any) -> Any:
    """Undo `train_bkspc_rows`: write each trained row into its layer's weight and remove the hooks
    and parameters (unpartitioned model). A no-op on a model without them."""
    import torch

    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    for m in (emb, out):
        if not hasattr(m, "_bkspc_hook"):
            continue
        with torch.no_grad():
            m.weight[m.bkspc_token_id] = getattr(m, BKSPC_ROW).to(m.weight.dtype)
        m._bkspc_hook.remove()
        del m._bkspc_hook
        delattr(m, BKSPC_ROW)
    return model


def has_frozen_parameters(model: Any) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def lora_model_for_export(cfg: Any, state: dict[str, Any], merge: bool, vocab_size: int | None = None,
                          bkspc: int | None = None) -> Any:
    """The base model of `cfg.model.init_from` with the adapter weights of `state` (consolidated from a
    LoRA run's checkpoint, trained parameters only): merged into a plain model, or the peft model.

    A SequenceMatch run (`bkspc`, the run's `vocab_size`): the base gets the `<bkspc>` row as the run
    did, and the trained rows are written into the merged weights, or carried by the adapter as
    peft trainable tokens (`adapter_with_token_rows`)."""
    from hetsp.loading import load_pretrained
    from hetsp.config import TrainConfig

    import torch

    base = load_pretrained(cfg.model, TrainConfig(zero_stage=1, dtype="fp32"), 1, torch.device("cpu"), None,
                           vocab_size=vocab_size)
    model = apply_lora(base, cfg.lora)
    if bkspc is not None:
        train_bkspc_rows(model, bkspc)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    # a shared parameter (the tied <bkspc> row) may also appear under its other names
    aliases = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad} - names
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in aliases}
    if set(state) != names:
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        raise ValueError(
            f"the checkpoint's trained parameters do not match the LoRA adapter of the config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}. Was it written by this run's config ([lora], model.init_from)?"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    if merge:
        return merge_bkspc_rows(model).merge_and_unload()
    if bkspc is not None:
        model = adapter_with_token_rows(model, cfg.lora, bkspc)
    model.peft_config["default"].base_model_name_or_path = str(cfg.model.init_from)
    return model


def adapter_with_token_rows(model: Any, lora: LoraConfig, bkspc_id: int) -> Any:
    """The peft model of `model` (LoRA plus `train_bkspc_rows`) with its `<bkspc>` rows as peft trainable
    tokens (`trainable_token_indices`: the embedding row, and the output row unless tied), so the
    adapter folder carries them. peft stores the rows' values (not a difference) and writes them over
    the base's rows, so base + adapter is the trained model once the base has the row (its
    vocabulary grown to the run's with `resize_token_embeddings`, whatever the new row's value)."""
    import torch
    from peft import get_peft_model

    emb, out = _row_modules(model)
    rows = {"emb": getattr(emb, BKSPC_ROW).detach().clone(), "out": getattr(out, BKSPC_ROW).detach().clone()}
    tied = out.weight is emb.weight
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base = merge_bkspc_rows(model).unload()
    names = {m: n.rsplit(".", 1)[-1] for n, m in base.named_modules()}
    indices = [bkspc_id] if tied else {names[base.get_input_embeddings()]: [bkspc_id],
                                       names[base.get_output_embeddings()]: [bkspc_id]}
    adapted = get_peft_model(base, peft_config(lora, trainable_token_indices=indices))
    params = dict(adapted.named_parameters())
    with torch.no_grad():
        for n, v in adapters.items():
            params[n].copy_(v)
        adapted.get_input_embeddings().token_adapter.trainable_tokens_delta["default"].copy_(rows["emb"][None])
        if not tied:
            adapted.get_output_embeddings().token_adapter.trainable_tokens_delta["default"].copy_(rows["out"][None])
    return adapted
