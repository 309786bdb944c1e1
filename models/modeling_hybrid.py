"""`HybridModel` / `HybridForCausalLM`: pre-norm layers of (mixer, SwiGLU MLP) over a token embedding.

No distributed code: sequence parallelism comes from outside, through the attention
interface (`config._attn_implementation`), the swappable kernels of every SSM mixer
(`set_kernels` or `models.kernels.KERNELS`), and forward keyword arguments that reach
every mixer. Packed rows: pass `cu_seqlens` (int32 boundaries, batch of one row), or a
`hetsp_shard` object whose `cu_seqlens` attribute is used; documents never share
state, convolution context or attention. Padded rows: a 0/1 `attention_mask`
(B, past + L) reaches every mixer as `token_mask` (B, L), True at real tokens;
pads feed no state, window or router, so left-padded prompts decode exactly as
each prompt alone (see `_token_mask` for what is refused).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache import HybridCache
from .configuration_hybrid import HybridConfig
from .kernels import KERNELS, positions_in_segment, segment_ids
from .kernels.tree import StackTree
from .layers import RMSNorm, SwiGLU, rotary_cos_sin, zero3_partitioned
from .mixers import build_mixer

_MASKED_IMPLEMENTATIONS = ("eager", "sdpa")


class HybridDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HybridConfig, layer_idx: int, kind: str):
        super().__init__()
        self.kind = kind
        self.mixer = build_mixer(kind, config, layer_idx)
        self.owns_residual = getattr(self.mixer, "owns_residual", False)
        if not self.owns_residual:
            self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_mixer_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states, **kwargs):
        if self.owns_residual:
            hidden_states = self.mixer(hidden_states, **kwargs)
        else:
            hidden_states = hidden_states + self.mixer(self.input_layernorm(hidden_states), **kwargs)
        return hidden_states + self.mlp(self.post_mixer_layernorm(hidden_states))


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Decoding state lives in HybridCache, created by the forward itself.
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        # A mixer partitioned by ZeRO-3 (built inside deepspeed.zero.Init to load a checkpoint)
        # initialised itself in its constructor, before partitioning.
        if hasattr(module, "reset_ssm_parameters") and not zero3_partitioned(module):
            module.reset_ssm_parameters()


def _mask(batch, length, past, cu_seqlens, attention_mask, dtype, device, tree=None):
    """Additive (B, 1, L, past + L) mask: causal (ancestors-or-self for a stack tree), same document, not padding."""
    q_pos = torch.arange(past, past + length, device=device)
    k_pos = torch.arange(past + length, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None].expand(batch, length, past + length)
    if tree is not None:
        flat = torch.arange(batch * length, device=device).view(batch, length)
        allowed = tree.visible(flat, flat)
    if cu_seqlens is not None:
        seg = segment_ids(batch, length, cu_seqlens, device)
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])
    if attention_mask is not None and attention_mask.ndim == 2:
        allowed = allowed & attention_mask[:, None, -(past + length) :].bool()
    out = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _token_mask(attention_mask, batch, length, past, cached, cu_seqlens, tree, impl, kinds):
    """(B, L) bool, True at the real tokens of this forward, or None when `attention_mask` holds no padding.

    Every mixer honours it exactly (pads feed no state, convolution window, router or GAU window;
    attention masks pad keys) for left padding, with or without a cache, and for right padding
    without one. Whatever cannot be computed exactly is refused here."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (batch, past + length):
        raise ValueError(
            f"HybridForCausalLM: a padded attention_mask must be (batch={batch}, past + length={past + length}) of 0/1, got {tuple(attention_mask.shape)}"
        )
    real = attention_mask.bool()
    if tree is not None or cu_seqlens is not None:
        raise ValueError("HybridForCausalLM: padding in attention_mask with packed rows (cu_seqlens or parents): drop the pads, documents are separated by cu_seqlens")
    if "attention" in kinds and impl not in _MASKED_IMPLEMENTATIONS:
        raise ValueError(f"HybridForCausalLM: padding in attention_mask needs attention implementation 'eager' or 'sdpa' (got {impl!r}); or run prompts one at a time")
    starts = real[:, :1].sum(-1) + (real[:, 1:] & ~real[:, :-1]).sum(-1)  # runs of real tokens per row
    ends = (~real[:, 1:] & real[:, :-1]).sum(-1)  # real -> pad steps per row
    if bool((starts > 1).any()):
        raise ValueError("HybridForCausalLM: attention_mask has pads between real tokens (state would decay through them): pad on the left (or the right without a cache)")
    if cached and bool((ends > 0).any()):
        raise ValueError("HybridForCausalLM: right padding with a cache: the cached state would run through the pads; pad prompts on the left for generation")
    return real[:, past:]


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [HybridDecoderLayer(config, i, kind) for i, kind in enumerate(config.layer_kinds)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: HybridCache | None = None,
        inputs_embeds=None,
        use_cache: bool | None = None,
        cu_seqlens=None,
        parents=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """parents: optional (B, L) long, each token's parent in its row (-1 at a document start) for
        sequences with a `<bkspc>` action (models/kernels/tree.py); positions default to depths."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        kwargs.pop("past_key_values", None)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if cu_seqlens is None and kwargs.get("hetsp_shard") is not None:
            cu_seqlens = getattr(kwargs["hetsp_shard"], "cu_seqlens", None)
        if parents is None and kwargs.get("hetsp_shard") is not None:
            parents = getattr(kwargs["hetsp_shard"], "local_parents", None)
        tree = StackTree.from_parents(parents)
        if tree is not None:
            if tree.batch != batch or tree.length != length:
                raise ValueError(f"parents must be (batch={batch}, length={length}), got ({tree.batch}, {tree.length})")
            if cache is not None or use_cache:
                raise ValueError("a forward with parents takes no cache; decode <bkspc> sequences with models.backspace_decoding")
            impl = self.config._attn_implementation
            if "attention" in self.config.layer_kinds and impl not in (*_MASKED_IMPLEMENTATIONS, "hetsp_ring"):
                raise ValueError(f"attention implementation {impl!r} cannot mask a <bkspc> tree; use 'eager', 'sdpa' or hetsp's ring attention")
        if use_cache and cache is None:
            cache = HybridCache(len(self.layers))
        if cache is not None and cu_seqlens is not None:
            raise ValueError("decoding with a cache works on unpacked rows; drop cu_seqlens or the cache")
        past = cache.get_seq_length() if cache is not None else 0
        impl = self.config._attn_implementation
        token_mask = _token_mask(attention_mask, batch, length, past, cache is not None, cu_seqlens, tree, impl, self.config.layer_kinds)
        padded = token_mask is not None
        if position_ids is None:
            if padded:
                # Each row's positions start at 0 at its first real token (as transformers' generate computes them).
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -length:]
            elif tree is not None:
                position_ids = tree.depths
            elif cu_seqlens is not None:
                position_ids = positions_in_segment(batch, length, cu_seqlens, device)
            else:
                position_ids = (torch.arange(length, device=device) + past)[None].expand(batch, length)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim or 2, self.config.rope_theta, inputs_embeds.dtype)
        mask = None
        # sdpa applies plain causal masking itself (and may pick a fused kernel) when no mask is given.
        plain_causal = impl == "sdpa" and cu_seqlens is None and past == 0 and not padded and tree is None
        if impl in _MASKED_IMPLEMENTATIONS and "attention" in self.config.layer_kinds and not plain_causal:
            mask = _mask(batch, length, past, cu_seqlens, attention_mask, inputs_embeds.dtype, device, tree)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(
                hidden,
                position_ids=position_ids,
                position_embeddings=(cos, sin),
                attention_mask=mask,
                cache=cache,
                cu_seqlens=cu_seqlens,
                token_mask=token_mask,
                **({"stack_tree": tree} if tree is not None else {}),
                **kwargs,
            )
        if cache is not None:
            cache.seen_tokens += length
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.ssd_kernel == "fla":
            from .kernels.ssd_fla import fla_available, ssd_chunk_scan_fla

            if not fla_available():
                raise ValueError("ssd_kernel = 'fla' needs flash-linear-attention (pip install fla-core); or set ssd_kernel = 'hetsp'")
            self.set_kernels(ssd_scan=ssd_chunk_scan_fla)
            logging.getLogger(__name__).info("SSD scan: flash-linear-attention's chunked kernels (ssd_kernel = 'fla')")

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: HybridCache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def set_kernels(self, **overrides) -> None:
        """Replace sequence kernels of every mixer of this model (names as in `models.kernels.KERNELS`)."""
        unknown = sorted(set(overrides) - set(KERNELS))
        if unknown:
            raise ValueError(f"unknown kernel name(s) {unknown}; valid names are {sorted(KERNELS)}")
        for layer in self.model.layers:
            layer.mixer.kernels.maps[0].update(overrides)

    def mixer_metrics(self) -> dict[str, float]:
        """Activation ratio of every SeqBoat layer in the last forward: {"layers.<i>.seqboat": ratio}."""
        out = {}
        for i, layer in enumerate(self.model.layers):
            ratio = getattr(layer.mixer, "last_activation_ratio", None)
            if ratio is not None:
                out[f"layers.{i}.{layer.kind}"] = float(ratio)
        return out
