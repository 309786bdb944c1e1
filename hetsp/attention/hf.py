"""transformers integration: ring attention as the attention implementation "hetsp_ring".

The shard metadata arrives per call as the forward keyword argument `hetsp_shard`
(a `ShardContext`), which transformers passes through to every attention layer:

    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register_attention())
    model(input_ids=ids[None], position_ids=ctx.positions[None], hetsp_shard=ctx)
"""

from __future__ import annotations

from .context import ShardContext
from .ring import ring_attention

NAME = "hetsp_ring"


def hetsp_ring_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **kwargs):
    """AttentionInterface function: query (1, H, T, D), key/value (1, K, T, D) -> ((1, T, H, D), None).

    The attention mask is ignored: sequence boundaries come from `hetsp_shard`.
    `sliding_window` (keys a query sees, itself included, as transformers' masks define it for
    Mistral, Qwen2, Gemma2) and `softcap` (Gemma2's attention logit softcapping) are applied
    by ring attention; attention sinks (`s_aux`) are refused.
    """
    ctx = kwargs.get("hetsp_shard")
    if not isinstance(ctx, ShardContext):
        raise ValueError(
            "attention 'hetsp_ring' needs the shard metadata: call the model as "
            "model(input_ids=ids[None], position_ids=ctx.positions[None], hetsp_shard=ctx) "
            "with ctx = hetsp.attention.make_shard_context(...)"
            + ("" if ctx is None else f" (got hetsp_shard of type {type(ctx).__name__})")
        )
    if query.shape[0] != 1:
        raise ValueError(f"attention 'hetsp_ring' takes packed sequences as batch size 1, got batch {query.shape[0]}")
    if dropout:
        raise ValueError("attention 'hetsp_ring' does not implement attention dropout; set attention_dropout=0")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"attention 'hetsp_ring' does not implement attention sinks (s_aux) of {type(module).__name__}; use a model without sinks")
    causal = getattr(module, "is_causal", True)
    out = ring_attention(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), ctx,
        causal=causal, softmax_scale=scaling, window=sliding_window, softcap=softcap,
    )
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    """Mask builder for "hetsp_ring": no mask tensor (ring attention uses cu_seqlens)."""
    return None


def register_attention() -> str:
    """Register "hetsp_ring" in transformers' AttentionInterface (idempotent); return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, hetsp_ring_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME
