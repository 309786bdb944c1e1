"""Reward functions usable as `module:function` in CoPG configs (called as fn(prompt, completion))."""
