"""Causal depthwise 1-D convolution that never reads across a segment start.

x (B, L, D); weight (D, K); bias (D,) or None; cu_seqlens (S+1,) with B == 1 or
None (S = B); halo (S, K-1, D) or None: the K-1 inputs just before each segment
(zeros when None). y[t] = bias + sum_k weight[:, k] * x[t - (K-1-k)], with inputs
before a segment's start taken from its halo. Returns y (B, L, D), no activation.
"""

from __future__ import annotations

import torch

from .segments import positions_in_segment, segment_bounds, segment_ids
from .tree import tree_conv_sources


def _check(x, weight, halo, num_segments):
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"expected x (B, L, D) and weight (D, K); got {tuple(x.shape)}, {tuple(weight.shape)}")
    k = weight.shape[1]
    if halo is not None and halo.shape != (num_segments, k - 1, x.shape[-1]):
        raise ValueError(f"halo must be (segments={num_segments}, K-1={k - 1}, D={x.shape[-1]}), got {tuple(halo.shape)}")


def _conv_tree(x, weight, bias, halo, tree):
    """Stack-structured rows (tree.py): the window of a token is its last K-1 ancestors and itself."""
    if halo is not None:
        raise NotImplementedError("a convolution halo (decoding cache) with stack-structured rows: decode them with models.backspace_decoding")
    batch, length, D = x.shape
    flat = x.reshape(batch * length, D)
    table = torch.cat([flat, flat.new_zeros((1, D))], 0)
    y = bias.to(x.dtype).expand(batch * length, D) if bias is not None else flat.new_zeros((batch * length, D))
    for tap, src in enumerate(tree_conv_sources(tree, weight.shape[1])):
        y = y + table.index_select(0, torch.where(src >= 0, src, batch * length)) * weight[:, tap]
    return y.reshape(batch, length, D)


def causal_conv1d(x, weight, bias=None, cu_seqlens=None, halo=None, tree=None):
    """Vectorised over taps: one gather per tap from [tokens; halos; zero].

    tree: a `tree.StackTree` for stack-structured rows (None: plain rows, today's path)."""
    if tree is not None:
        return _conv_tree(x, weight, bias, halo, tree)
    batch, length, D = x.shape
    num_segments = segment_bounds(batch, length, cu_seqlens, x.device).numel() - 1
    _check(x, weight, halo, num_segments)
    k = weight.shape[1]
    flat = x.reshape(batch * length, D)
    halo_flat = halo.reshape(-1, D) if halo is not None else flat.new_zeros((0, D))
    zero_row = batch * length + halo_flat.shape[0]
    table = torch.cat([flat, halo_flat.to(flat.dtype), flat.new_zeros((1, D))], 0)
    pos = positions_in_segment(batch, length, cu_seqlens, x.device).reshape(-1)
    seg = segment_ids(batch, length, cu_seqlens, x.device).reshape(-1)
    tok = torch.arange(batch * length, device=x.device)
    y = bias.to(x.dtype).expand(batch * length, D) if bias is not None else flat.new_zeros((batch * length, D))
    for tap in range(k):
        shift = k - 1 - tap
        if halo is not None:  # x[start - m] is halo row K-1-m of the segment
            outside = batch * length + seg * (k - 1) + (k - 1) - (shift - pos)
        else:
            outside = torch.full_like(tok, zero_row)
        src = torch.where(pos >= shift, tok - shift, outside)
        y = y + table.index_select(0, src) * weight[:, tap]
    return y.reshape(batch, length, D)


def causal_conv1d_ref(x, weight, bias=None, cu_seqlens=None, halo=None, tree=None):
    """Sequential twin of `causal_conv1d`: each segment padded with its halo, token by token."""
    if tree is not None:
        return _conv_tree(x, weight, bias, halo, tree)
    batch, length, D = x.shape
    bounds = segment_bounds(batch, length, cu_seqlens, x.device).tolist()
    _check(x, weight, halo, len(bounds) - 1)
    k = weight.shape[1]
    flat = x.reshape(batch * length, D)
    out = []
    for s in range(len(bounds) - 1):
        pre = halo[s].to(x.dtype) if halo is not None else flat.new_zeros((k - 1, D))
        seq = torch.cat([pre, flat[bounds[s] : bounds[s + 1]]], 0)
        for t in range(bounds[s + 1] - bounds[s]):
            window = seq[t : t + k]  # (K, D)
            y = (window.T * weight).sum(-1)
            out.append(y + bias if bias is not None else y)
    y = torch.stack(out, 0) if out else flat.new_zeros((0, D))
    return y.reshape(batch, length, D)


def conv_tail(x, cu_seqlens, halo, k):
    """(S, K-1, D): the last K-1 inputs of each segment (its halo prepended), the state for decoding."""
    batch, length, D = x.shape
    bounds = segment_bounds(batch, length, cu_seqlens, x.device).tolist()
    flat = x.reshape(batch * length, D)
    tails = []
    for s in range(len(bounds) - 1):
        pre = halo[s].to(x.dtype) if halo is not None else flat.new_zeros((k - 1, D))
        seq = torch.cat([pre, flat[bounds[s] : bounds[s + 1]]], 0)
        tails.append(seq[seq.shape[0] - (k - 1) :])
    return torch.stack(tails, 0)
