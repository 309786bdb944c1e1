"""Which modules of a model carry a recurrent state or a causal convolution, and which of
those hetsp makes sequence-parallel (an explicit allow-list).

A module hetsp does not handle would keep its state and convolution window running across
packed documents and shard boundaries: a wrong result without an error. So every such module
is found and refused by name. A module counts as recurrent when any of these holds:
  - it owns a parameter of an SSM or linear recurrence (`A_log`, `dt_bias`, `A`, `log_A`);
  - it owns a causal depthwise `nn.Conv1d` (groups == channels, padding == kernel - 1 > 0);
  - it has a state or convolution size attribute (`ssm_state_size`, `conv_kernel_size`, ...);
  - its class name belongs to a recurrent family (Mixer, ShortConv, DeltaNet, RWKV, ...).
The subtree of a flagged or handled module is not searched further (one name per mixer).
"""

from __future__ import annotations

import re

from torch import nn

# Mixers hetsp makes sequence-parallel: (modeling module, class name). The hybrid model's mixers
# (models/) are recognised by `hybrid.is_hybrid_mixer`; these are the transformers ones.
HANDLED_HF_MIXERS = frozenset(
    {
        ("transformers.models.bamba.modeling_bamba", "BambaMixer"),
        ("transformers.models.granitemoehybrid.modeling_granitemoehybrid", "GraniteMoeHybridMambaLayer"),
    }
)

_STATE_PARAMS = ("A_log", "dt_bias", "A", "log_A")
_STATE_ATTRS = ("ssm_state_size", "conv_kernel_size", "d_state", "d_conv", "state_size", "conv_kernel", "L_cache", "conv_L_cache", "time_step_rank")
_FAMILY = re.compile(r"mixer|shortconv|deltanet|deltarule|rwkv|retention|recurrent|rglru|lstm|hyena|ssm|mamba(layer)?$", re.IGNORECASE)
_NOT_RECURRENT = re.compile(r"attention|norm|mlp|moe|expert|router|rotary|embedding", re.IGNORECASE)


def _causal_depthwise_conv(conv: nn.Module) -> bool:
    if not isinstance(conv, nn.Conv1d):
        return False
    k = conv.kernel_size[0]
    pad = conv.padding[0] if isinstance(conv.padding, tuple) else None
    return k > 1 and conv.groups == conv.in_channels and pad == k - 1


def recurrence_evidence(module: nn.Module) -> str | None:
    """Why `module` looks like a recurrent or causal-convolution mixer, or None."""
    own = dict(module.named_parameters(recurse=False))
    for name in _STATE_PARAMS:
        if name in own:
            return f"parameter {name}"
    for child_name, child in module.named_children():
        if _causal_depthwise_conv(child):
            return f"causal depthwise Conv1d {child_name!r}"
    for attr in _STATE_ATTRS:
        if isinstance(getattr(module, attr, None), int) and not isinstance(module, nn.Conv1d):
            return f"attribute {attr}"
    name = type(module).__name__
    if _FAMILY.search(name) and not _NOT_RECURRENT.search(name):
        return "class name of a recurrent family"
    return None


def is_handled(module: nn.Module) -> bool:
    """Whether hetsp makes this mixer sequence-parallel (the allow-list)."""
    from hetsp.ssm_parallel import hybrid

    if hybrid.is_hybrid_mixer(module):
        return True
    cls = type(module)
    return (cls.__module__, cls.__name__) in HANDLED_HF_MIXERS


def recurrent_modules(model: nn.Module) -> list[tuple[str, nn.Module, str | None]]:
    """(qualified name, module, evidence) of every recurrent mixer; evidence None when handled."""
    found = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if is_handled(child):
                found.append((path, child, None))
                continue
            why = recurrence_evidence(child)
            if why is not None:
                found.append((path, child, why))
                continue
            walk(path, child)

    walk("", model)
    return found


def check_supported(model: nn.Module) -> list[nn.Module]:
    """The handled mixers of `model`; raises naming every recurrent mixer hetsp does not handle."""
    found = recurrent_modules(model)
    bad = [(path, mod, why) for path, mod, why in found if why is not None]
    if bad:
        classes = sorted({type(m).__name__ for _, m, _ in bad})
        path, mod, why = bad[0]
        allowed = sorted(name for _, name in HANDLED_HF_MIXERS) + ["models.HybridForCausalLM mixers (s4d, ema, mamba2, seqboat)"]
        raise ValueError(
            f"{type(model).__name__}: hetsp does not make {', '.join(classes)} sequence-parallel (e.g. {path}: {why}); "
            "its recurrent state and causal convolution would leak across packed documents and shards. "
            f"hetsp handles: {', '.join(allowed)}; use a model built from these, or attention-only layers"
        )
    return [mod for _, mod, _ in found]


def require_parallelized(model: nn.Module) -> None:
    """Refuse a model with recurrent mixers that `parallelize` has not prepared."""
    from hetsp.ssm_parallel.parallelize import is_parallelized

    if is_parallelized(model):
        return
    found = recurrent_modules(model)
    if found:
        classes = sorted({type(m).__name__ for _, m, _ in found})
        raise ValueError(
            f"{type(model).__name__} has recurrent or causal-convolution layers ({', '.join(classes)}) but was not "
            "prepared for sequence parallelism; call hetsp.ssm_parallel.parallelize(model) before running a plan"
        )
