"""Ring attention over packed variable-length sequences for groups of ranks."""

from .comm import warm_up
from .context import ShardContext, make_shard_context
from .hf import register_attention
from .ring import ring_attention, ring_attention_ref

__all__ = ["ShardContext", "make_shard_context", "ring_attention", "ring_attention_ref", "register_attention", "warm_up"]
