"""Ring attention over packed variable-length sequences for groups of ranks.

    ctx = make_shard_context(lengths, group_start, group_size, global_rank, device)  # once per micro-batch
    out = ring_attention(q, k, v, ctx, causal=True)   # q (T, H, D), k/v (T, K, D), T = ctx.num_tokens

or, for a Hugging Face model built with attn_implementation=register_attention():

    model(input_ids=ids[None], position_ids=ctx.positions[None], hetsp_shard=ctx)

A group is the global ranks [group_start, group_start + group_size) on the default process
group; groups exchange point to point, so several run at once. Under NCCL call `warm_up`
once on every rank at start-up. Block kernels: hetsp.attention.kernels.
"""

from .comm import warm_up
from .context import ShardContext, make_shard_context
from .hf import register_attention
from .ring import ring_attention, ring_attention_ref

__all__ = ["ShardContext", "make_shard_context", "ring_attention", "ring_attention_ref", "register_attention", "warm_up"]
