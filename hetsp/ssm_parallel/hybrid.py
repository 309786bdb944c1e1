"""Sequence parallelism for `models.HybridForCausalLM` mixers (s4d, ema, mamba2, seqboat).

Each SSM mixer reads its kernels from ``mixer.kernels`` at call time. For a
forward with ``hetsp_shard`` of a group of more than one rank, a forward
pre-hook hands the mixer the rank's *segment* boundaries as ``cu_seqlens``
(one segment per local zigzag chunk, two per sequence, so no local segment
spans a gap in its document) and the kernels below, installed in the mixer's
override map, turn each single-process kernel into its group version:

- scans (``s4d_scan``, ``ema_scan``, ``ssd_scan``): run per segment from a zero
  state, exchange (decay, end state) per segment, then add the response to the
  incoming state (outputs are affine in it, so that is exact): for the SSD
  ``exp(cumsum(dt A)) C S_in``, for S4D and the EMA ``C A^(j+1) S_in`` read
  out as their kernels do (2 Re(.) for S4D's conjugate pairs);
- ``causal_conv1d``: the kernel's per-segment ``halo`` comes from the ranks
  holding the previous tokens (`halo_exchange`);
- ``local_attention`` (SeqBoat, `seqboat.py`): each segment attends with the
  last W activated tokens of all earlier chunks of its document as a prefix.

Groups of one rank, and forwards without ``hetsp_shard``, run the model's own
kernels untouched.

Sequences with a `<bkspc>` action (``hetsp_shard.tree``) on a group of more than one
rank: every mixer passes states across shards on the tree (`tree_state.py`,
`tree_kernels.py`): each segment is scanned from zero as a tree, the (decay, state) of
the tokens other segments branch from (their anchors) are exchanged, and each token adds
its anchor's state; the convolution reads its K-1 ancestors from other segments' exported
rows; SeqBoat's GAU gets, per anchor, its last W activated ancestors (`seqboat_tree.py`).
Sequences without `<bkspc>` never take these paths.
"""

from __future__ import annotations

import torch

from hetsp.ssm_parallel import seqboat_tree, tree_kernels
from hetsp.ssm_parallel.tree_state import local_tree
from hetsp.ssm_parallel.comm import GroupSpec, halo_exchange
from hetsp.ssm_parallel.lti import lti_state_response
from hetsp.ssm_parallel.seqboat import local_attention_group
from hetsp.ssm_parallel.ssd import state_response
from hetsp.ssm_parallel.segments import Segments, halo_routes, segments_of
from hetsp.ssm_parallel.state import pass_states

SSM_KINDS = ("s4d", "ema", "mamba2", "seqboat")
_KERNELS_BY_KIND = {
    "s4d": ("s4d_scan",),
    "ema": ("ema_scan",),
    "mamba2": ("causal_conv1d", "ssd_scan"),
    "seqboat": ("ema_scan", "local_attention"),
}
_ACTIVE = "_hetsp_sp_active"  # (Segments, GroupSpec) during a sequence-parallel forward of the mixer
_TREE = "_hetsp_sp_tree"  # (ShardContext, GroupSpec) during a forward on <bkspc> sequences


def _active(mixer):
    return getattr(mixer, _ACTIVE, None)


def _tree_active(mixer):
    return getattr(mixer, _TREE, None)


def _no_cache(name: str, state) -> None:
    if state is not None:
        raise ValueError(
            f"{name} under sequence parallelism: decoding state (cache) is not supported; run the sharded "
            "forward with use_cache=False"
        )


def _segment_sum(t_TX: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``[T, *X] -> [num_segments, *X]``: sum over each segment's tokens."""
    seg_id = torch.repeat_interleave(
        torch.arange(segments.num_segments, device=t_TX.device), torch.tensor(segments.length, device=t_TX.device)
    )
    out = t_TX.new_zeros((segments.num_segments, *t_TX.shape[1:]))
    return out.index_add(0, seg_id, t_TX)


def _lengths_like(t: torch.Tensor, segments: Segments) -> torch.Tensor:
    return torch.tensor(segments.length, dtype=t.real.dtype if t.is_complex() else t.dtype, device=t.device)


def _through(y: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    """`y` with a (zero) dependence on `s_in`, so the mirror exchange runs in backward on every rank."""
    return y + 0 * (s_in.real if s_in.is_complex() else s_in).sum().to(y.dtype)


def _lti_scan(name, inner, mixer):
    """s4d_scan / ema_scan: (u, A, B, C, cu_seqlens, initial_state) with a time-invariant diagonal A."""

    def scan(u, A, B, C, cu_seqlens=None, initial_state=None, **kw):
        tree_act = _tree_active(mixer)
        if tree_act is not None:
            _no_cache(name, initial_state)
            y = tree_kernels.lti_scan_tree(u[0], A, B, C, *tree_act)
            # The kernels' readouts: S4D sums conjugate pairs (2 Re), the EMA is real.
            y = 2 * y.real if name == "s4d_scan" else y
            return y.to(u.dtype)[None], None
        act = _active(mixer)
        if act is None:
            return inner(u, A, B, C, cu_seqlens=cu_seqlens, initial_state=initial_state, **kw)
        _no_cache(name, initial_state)
        segments, group = act
        steps = _lengths_like(A, segments)[:, None, None]
        decay = torch.exp(steps * torch.log(A)[None])  # A ** length, per segment
        if segments.num_tokens == 0:  # the models' chunked kernels need a token; the exchange still runs
            end = torch.zeros_like(decay)
            s_in = pass_states(decay, end, segments, group)
            return _through(u.new_zeros(u.shape), s_in), end
        y0, end = inner(u, A, B, C, cu_seqlens=cu_seqlens, **kw)
        s_in = pass_states(decay, end, segments, group)
        response = lti_state_response(A, C, s_in, segments)
        # The kernels' readouts: S4D sums conjugate pairs (2 Re), the EMA is real.
        response = 2 * response.real if name == "s4d_scan" else response
        return y0 + response.to(y0.dtype)[None], end

    return scan


def _ssd_scan(inner, mixer):
    def ssd_scan(x, dt, A, B, C, chunk_size=64, cu_seqlens=None, initial_states=None, **kw):
        tree_act = _tree_active(mixer)
        if tree_act is not None:
            _no_cache("ssd_scan", initial_states)
            return tree_kernels.ssd_scan_tree(x[0], dt[0], A, B[0], C[0], *tree_act)[None], None
        act = _active(mixer)
        if act is None:
            return inner(x, dt, A, B, C, chunk_size, cu_seqlens=cu_seqlens, initial_states=initial_states, **kw)
        _no_cache("ssd_scan", initial_states)
        segments, group = act
        log_decay = _segment_sum((dt[0] * A).to(torch.promote_types(dt.dtype, torch.float32)), segments)  # [S, H]
        if segments.num_tokens == 0:  # the models' chunked kernels need a token; the exchange still runs
            batch, _, num_heads, head_dim = x.shape
            end = x.new_zeros((segments.num_segments, num_heads, head_dim, B.shape[-1]))
            s_in = pass_states(log_decay.exp(), end, segments, group)
            return _through(x.new_zeros(x.shape), s_in), end
        y0, end = inner(x, dt, A, B, C, chunk_size, cu_seqlens=cu_seqlens, **kw)
        s_in = pass_states(log_decay.exp(), end, segments, group)
        # Output is affine in the entering state: add its response (cheaper than a second scan).
        y = y0 + state_response(dt[0] * A, C[0], s_in, segments).to(y0.dtype)[None]
        return y, end

    return ssd_scan


def _conv(inner, mixer):
    def causal_conv1d(x, weight, bias=None, cu_seqlens=None, halo=None, **kw):
        tree_act = _tree_active(mixer)
        if tree_act is not None:
            _no_cache("causal_conv1d", halo)
            return tree_kernels.conv_tree(x[0], weight, bias, *tree_act).to(x.dtype)[None]
        act = _active(mixer)
        if act is None:
            return inner(x, weight, bias, cu_seqlens=cu_seqlens, halo=halo, **kw)
        _no_cache("causal_conv1d", halo)
        segments, group = act
        width = weight.shape[1] - 1
        rows = halo_exchange(x[0], halo_routes(segments.lengths, group.size, group.rank, width), group)
        return inner(x, weight, bias, cu_seqlens=cu_seqlens, halo=rows.view(segments.num_segments, width, -1), **kw)

    return causal_conv1d


def _local_attention(inner, mixer):
    group_fn = local_attention_group(inner, lambda: _active(mixer))

    def local_attention(q, k, v, seg, window, scale, prefix_k=None, *args, tree=None, tree_index=None, **kw):
        tree_act = _tree_active(mixer)
        if tree_act is None:
            tree_kw = {} if tree is None else {"tree": tree, "tree_index": tree_index}
            return group_fn(q, k, v, seg, window, scale, prefix_k, *args, **tree_kw, **kw)
        _no_cache("local_attention", prefix_k)
        return seqboat_tree.local_attention_tree(inner, q, k, v, window, scale, tree_index, *tree_act)

    return local_attention


_FACTORIES = {
    "s4d_scan": lambda inner, mixer: _lti_scan("s4d_scan", inner, mixer),
    "ema_scan": lambda inner, mixer: _lti_scan("ema_scan", inner, mixer),
    "ssd_scan": _ssd_scan,
    "causal_conv1d": _conv,
    "local_attention": _local_attention,
}


class GroupKernel:
    """The group version of kernel `name` around `inner`, acting while `mixer` is activated.

    A callable object rather than a closure so that a deep copy of the model (the frozen
    reference of CoPG) gets kernels bound to the copy's own mixer: `copy.deepcopy` maps
    `mixer` (and `inner`, when it is a `_SharedKernel`) to their copies.
    """

    _hetsp_sp = True

    def __init__(self, name: str, inner, mixer) -> None:
        self.name, self.inner, self.mixer = name, inner, mixer
        self._fn = _FACTORIES[name](inner, mixer)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        import copy

        return GroupKernel(self.name, copy.deepcopy(self.inner, memo), copy.deepcopy(self.mixer, memo))


class _SharedKernel:
    """Kernel `name` of the model-wide table of `mixer`, looked up at call time, so later swaps
    of that table still apply (a deep copy looks it up in the copy's table)."""

    def __init__(self, mixer, name: str) -> None:
        self.mixer, self.name = mixer, name

    def __call__(self, *args, **kwargs):
        return _shared_kernel(self.mixer, self.name)(*args, **kwargs)


def group_kernel(name: str, inner, mixer) -> GroupKernel:
    """The group version of kernel `name` around `inner`; it acts while `mixer` is activated.

    `mixer` is any object: `activate(mixer, segments, group)` switches the group path on, and
    the kernels then take ``cu_seqlens`` with one segment per local chunk (`Segments.cu_seqlens`).
    """
    if name not in _FACTORIES:
        raise ValueError(f"no group version of kernel {name!r}; known: {sorted(_FACTORIES)}")
    return GroupKernel(name, inner, mixer)


def activate(mixer, segments: Segments | None, group: GroupSpec | None = None) -> None:
    """Switch the group kernels of `mixer` on (segments and group given) or off (None)."""
    setattr(mixer, _ACTIVE, None if segments is None else (segments, group))


def _pre_hook(mixer, args, kwargs):
    setattr(mixer, _ACTIVE, None)
    setattr(mixer, _TREE, None)
    shard = kwargs.get("hetsp_shard")
    if shard is None or int(shard.group_size) == 1:
        return None
    tree = getattr(shard, "tree", None) is not None
    for name in _KERNELS_BY_KIND[mixer.kind]:
        if not getattr(mixer.kernels.get(name), "_hetsp_sp", False):
            raise ValueError(
                f"layer {mixer.layer_idx} ({mixer.kind}): kernel {name!r} was replaced after "
                "hetsp.ssm_parallel.parallelize(model); call set_kernels before parallelize"
            )
    segments = segments_of(shard)
    device = args[0].device if args else kwargs["hidden_states"].device
    kwargs = dict(kwargs, cu_seqlens=torch.tensor(segments.cu_seqlens(), dtype=torch.int32, device=device))
    if tree:
        setattr(mixer, _TREE, (shard, GroupSpec.of(shard)))
        kwargs["stack_tree"] = local_tree(shard, device)
    else:
        setattr(mixer, _ACTIVE, (segments, GroupSpec.of(shard)))
    return args, kwargs


def _post_hook(mixer, args, kwargs, output):
    setattr(mixer, _ACTIVE, None)
    setattr(mixer, _TREE, None)
    return None


def is_hybrid_mixer(module) -> bool:
    return getattr(module, "kind", None) in SSM_KINDS and hasattr(module, "kernels") and hasattr(module.kernels, "maps")


def parallelize_mixer(mixer) -> None:
    """Install the group kernels and hooks on one SSM mixer of a `HybridForCausalLM` (once)."""
    if getattr(mixer, "_hetsp_sp_installed", False):
        return
    overrides = mixer.kernels.maps[0]
    for name in _KERNELS_BY_KIND[mixer.kind]:
        inner = overrides[name] if name in overrides else _SharedKernel(mixer, name)
        overrides[name] = group_kernel(name, inner, mixer)
    setattr(mixer, _ACTIVE, None)
    setattr(mixer, _TREE, None)
    mixer.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    mixer.register_forward_hook(_post_hook, with_kwargs=True)
    mixer._hetsp_sp_installed = True


def kernel_overrides(mixer) -> dict:
    """The per-model kernel overrides of `mixer` as they were before `parallelize_mixer`: its group
    kernels unwrapped, the model-wide ones (`_SharedKernel`) left out. A copy of the model built
    anew (the ZeRO-3 reference of CoPG) gets these, then its own group kernels."""
    out = {}
    for name, k in mixer.kernels.maps[0].items():
        if isinstance(k, GroupKernel):
            k = k.inner
        if not isinstance(k, _SharedKernel):
            out[name] = k
    return out


def _shared_kernel(mixer, name):
    for m in mixer.kernels.maps[1:]:
        if name in m:
            return m[name]
    raise KeyError(name)
