"""The live CoPG reference under ZeRO-3: a frozen copy of the starting policy, partitioned too.

`partitioned_copy(engine)` builds the policy's model class from its config on the meta device
(the structure only, no memory), then makes its parameters one at a time: every rank gathers one
policy parameter (``GatheredParameters``), clones it into the copy's parameter, and
``deepspeed.zero.Init(module=...)`` partitions that parameter at once over the policy's
data-parallel group with the run's DeepSpeed config. No rank holds more than its partitions plus
one full parameter, and the copy equals the policy bit for bit, whatever the policy's origin (a
checkpoint or a random initialisation), without first initialising a second set of values as
building inside the ``zero.Init`` context would. Buffers, not partitioned, are cloned from the
policy.

The copy is wrapped in a DeepSpeed engine without an optimizer: DeepSpeed then installs only the
ZeRO-3 parameter-offload hooks (``DeepSpeedZeRoOffload``), which gather each module's parameters
for its forward and release them afterwards, as for the policy. Every rank must take part in every
forward (`hetsp.executor.run_plan` runs idle ranks with placeholders). Sequence-parallel SSM
kernels are installed on the copy's own mixers (`hetsp.ssm_parallel.parallelize`), after the
policy's kernel overrides are carried over (`hetsp.ssm_parallel.hybrid.kernel_overrides`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def is_partitioned(module: Any) -> bool:
    """Whether `module`'s parameters are ZeRO-3 partitioned."""
    from models.layers import zero3_partitioned

    return zero3_partitioned(module, recurse=True)


def partitioned_copy(engine: Any) -> Any:
    """A frozen, ZeRO-3 partitioned copy of `engine.module` (the policy as it is now), inside a
    DeepSpeed engine with no optimizer, in eval mode."""
    import deepspeed

    from hetsp.ssm_parallel import parallelize
    from hetsp.ssm_parallel.hybrid import is_hybrid_mixer, kernel_overrides

    policy = engine.module
    config = dict(engine.config)
    group = next(p.ds_process_group for p in policy.parameters() if hasattr(p, "ds_id"))
    with torch.device("meta"):  # the structure only: no memory, and the model's own init code runs as usual
        frozen = type(policy)._from_config(policy.config)
    src = dict(policy.named_parameters())
    if list(src) != [n for n, _ in frozen.named_parameters()]:
        raise NotImplementedError(f"objective.reference = 'live' under ZeRO-3: {type(policy).__name__} rebuilt from its "
                                  "config has other parameters than the policy; use reference = 'precomputed'")
    owners: dict[int, list[tuple[Any, str]]] = {}  # a tied parameter has several owners
    for m in frozen.modules():
        for name, q in m._parameters.items():
            if q is not None:
                owners.setdefault(id(q), []).append((m, name))
    for name, q in list(frozen.named_parameters()):
        p = src[name]
        full_shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(q.shape) != full_shape:
            raise NotImplementedError(f"objective.reference = 'live' under ZeRO-3: the copy's {name} has shape "
                                      f"{tuple(q.shape)}, the policy's {full_shape}; use reference = 'precomputed'")
        gather = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext()
        with gather:
            new = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
        for m, attr in owners[id(q)]:
            m._parameters[attr] = new
        # partitioned at once (as zero.Init does with each module it builds): one full parameter at a time
        deepspeed.zero.Init(module=torch.nn.ParameterList([new]), config_dict_or_path=config,
                            data_parallel_group=group, mem_efficient_linear=False)
    for mod_name, m in frozen.named_modules():  # buffers are not partitioned: the policy's, as they are
        source = policy.get_submodule(mod_name)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = source._buffers[name].detach().clone()
    for m, n in zip([m for m in policy.modules() if is_hybrid_mixer(m)], [m for m in frozen.modules() if is_hybrid_mixer(m)]):
        n.kernels.maps[0].clear()
        n.kernels.maps[0].update(kernel_overrides(m))
    parallelize(frozen)
    frozen.eval()
    wrapped, *_ = deepspeed.initialize(model=frozen, config=config)
    wrapped.eval()
    return wrapped


def partition_numel(module: Any) -> tuple[int, int]:
    """(elements of `module`'s parameters this rank stores in its ZeRO-3 partitions, elements of the
    full parameters); tied parameters are counted once."""
    params = list(module.parameters())
    return (sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params))


def describe(reference: Any) -> str | None:
    """One line on the partitioned copy's parameter bytes on this rank, beside the policy's
    (None when `reference` is not a ZeRO-3 copy)."""
    module = getattr(reference, "module", reference)
    if not is_partitioned(module):
        return None
    stored, full = (n * next(module.parameters()).ds_tensor.element_size() for n in partition_numel(module))
    return (f"live reference: a ZeRO-3 partitioned frozen copy, {stored / 2**20:.2f} MiB of parameters on this rank "
            f"of {full / 2**20:.2f} MiB")
