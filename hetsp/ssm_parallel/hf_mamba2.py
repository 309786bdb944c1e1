"""Sequence parallelism for transformers' Mamba-2 hybrids (Bamba, GraniteMoeHybrid).

Their mixers call three module-level functions of their modeling file:
``causal_conv1d_fn`` (depthwise conv, [B, C, T]), ``mamba2_chunk_scan``
(the SSD scan) and ``mamba2_split_conv1d_scan_combined`` (a fused hub kernel
that returns None when unavailable). `patch_module` replaces them in that
module with wrappers that, when the forward received ``hetsp_shard`` (a
`hetsp.attention.ShardContext`, which transformers passes down in
``**kwargs``), run the conv with halos and the scan with state passing over
the shard's zigzag segments, and refuse the fused kernel so that the unfused
path runs. Without ``hetsp_shard`` the original functions run unchanged, so
patching a module affects no other use of the model. Packed documents are
separated at their boundaries in both the group-of-one and the group case.
Sequences with a `<bkspc>` action (``hetsp_shard.tree``) take the tree versions with
state passing across shards (`tree_kernels.py`), on groups of any size.
"""

from __future__ import annotations

import logging
import math
from types import ModuleType

import torch
import torch.nn.functional as F

from hetsp.ssm_parallel.comm import GroupSpec
from hetsp.ssm_parallel.conv import causal_conv1d_sp
from hetsp.ssm_parallel.segments import segments_of
from hetsp.ssm_parallel.ssd import ssd_scan_sp
from hetsp.ssm_parallel.tree_kernels import conv_tree, ssd_scan_tree

log = logging.getLogger(__name__)

_PATCHED_ATTR = "_hetsp_sp_originals"
_FUNCTIONS = ("causal_conv1d_fn", "mamba2_chunk_scan", "mamba2_split_conv1d_scan_combined")


# Modeling files whose mixers pass the forward's **kwargs (hence hetsp_shard) to the swapped functions,
# checked by tests/test_hf_clients.py against the stock model run one document at a time.
TESTED_MODULES = (
    "transformers.models.bamba.modeling_bamba",
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid",
)


def supports(module: ModuleType) -> bool:
    """Whether a modeling module exposes the three functions this patch swaps."""
    return all(callable(getattr(module, name, None)) for name in _FUNCTIONS)


def _packed(name: str, t: torch.Tensor) -> None:
    if t.shape[0] != 1:
        raise ValueError(f"{name}: with hetsp_shard the sequences are packed into batch size 1, got batch {t.shape[0]}")


def _has_tree(shard) -> bool:
    """Sequences with a `<bkspc>` action: the tree versions with state passing (tree_kernels.py)."""
    return getattr(shard, "tree", None) is not None


def _make_conv(original):
    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        shard = kwargs.get("hetsp_shard")
        if shard is None:
            return original(hidden_states, weight, bias, activation=activation, **kwargs)
        _packed("causal_conv1d_fn", hidden_states)
        from transformers.activations import ACT2FN

        x_TC, group = hidden_states[0].t(), GroupSpec.of(shard)
        if _has_tree(shard):
            y_TC = conv_tree(x_TC, weight, bias, shard, group)
        else:
            y_TC = causal_conv1d_sp(x_TC, weight, bias, segments_of(shard), group)
        out = y_TC.t().unsqueeze(0)
        if activation is not None:
            out = ACT2FN[activation](out)
        return out.to(hidden_states.dtype)

    return causal_conv1d_fn


def _make_scan(original):
    def mamba2_chunk_scan(
        hidden_states,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=None,
        dt_bias=None,
        initial_states=None,
        dt_softplus=False,
        dt_limit=(0.0, float("inf")),
        return_final_states=False,
        **kwargs,
    ):
        shard = kwargs.get("hetsp_shard")
        if shard is None:
            return original(
                hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states,
                dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states, **kwargs,
            )
        if initial_states is not None or return_final_states:
            raise ValueError(
                "mamba2_chunk_scan under hetsp_shard: a cache (initial or final states) is not supported in "
                "sequence-parallel training; call the model with use_cache=False"
            )
        _packed("mamba2_chunk_scan", hidden_states)
        if dt_bias is not None:
            dt = dt + dt_bias.to(dt.dtype)
        if dt_softplus:
            dt = F.softplus(dt)
        dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
        out_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        if _has_tree(shard):
            x = hidden_states[0].to(out_dtype)
            y = ssd_scan_tree(x, dt[0], A, B[0], C[0], shard, GroupSpec.of(shard))
            if D is not None:
                y = y + D.to(y.dtype)[:, None] * x
            return y.unsqueeze(0).to(out_dtype)

        def local(x, dt_, b, c):
            # The result does not depend on the chunk size; a short segment is not padded to a full chunk.
            y, end = original(
                x[None], dt_[None], A, b[None], c[None], min(chunk_size, x.shape[0]), D=D, dt_bias=None, initial_states=None,
                dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=True,
            )
            return y[0], end[0]

        y = ssd_scan_sp(local, hidden_states[0], dt[0], A, B[0], C[0], segments_of(shard), GroupSpec.of(shard))
        return y.unsqueeze(0).to(out_dtype)

    return mamba2_chunk_scan


def _make_fused(original):
    def mamba2_split_conv1d_scan_combined(*args, **kwargs):
        if kwargs.get("hetsp_shard") is not None:
            return None  # the unfused path, whose conv and scan are swapped, runs instead
        return original(*args, **kwargs)

    return mamba2_split_conv1d_scan_combined


def patch_module(module: ModuleType) -> bool:
    """Swap the conv, scan and fused functions of `module` (idempotent). True when newly patched."""
    if getattr(module, _PATCHED_ATTR, None) is not None:
        return False
    if not supports(module):
        raise ValueError(f"{module.__name__} does not define {', '.join(_FUNCTIONS)}; it cannot be patched")
    if module.__name__ not in TESTED_MODULES:
        raise ValueError(
            f"{module.__name__}: sequence parallelism for this Mamba-2 family is not verified (its packed "
            f"documents would share state); supported: {', '.join(m.rsplit('.', 1)[-1] for m in TESTED_MODULES)}"
        )
    originals = {name: getattr(module, name) for name in _FUNCTIONS}
    module.causal_conv1d_fn = _make_conv(originals["causal_conv1d_fn"])
    module.mamba2_chunk_scan = _make_scan(originals["mamba2_chunk_scan"])
    module.mamba2_split_conv1d_scan_combined = _make_fused(originals["mamba2_split_conv1d_scan_combined"])
    setattr(module, _PATCHED_ATTR, originals)
    log.info("sequence parallelism: swapped conv and SSD scan functions of %s", module.__name__)
    return True


def unpatch_module(module: ModuleType) -> None:
    """Restore the functions `patch_module` replaced (for tests)."""
    originals = getattr(module, _PATCHED_ATTR, None)
    if originals is None:
        return
    for name, fn in originals.items():
        setattr(module, name, fn)
    setattr(module, _PATCHED_ATTR, None)
