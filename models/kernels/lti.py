"""Time-invariant diagonal SSM scans: S4D (complex modes) and MEGA's damped EMA (real).

Both compute, per channel h and state n, with resets at segment starts:

    state[t] = A[h, n] * state[t-1] + B[h, n] * u[t, h]        (state before a segment: its initial state or 0)
    y[t, h]  = sum_n C[h, n] * state[t, n]

`s4d_scan` returns 2 Re(y) (conjugate pairs of modes), `ema_scan` returns y (real).
Each has a `_ref` twin (sequential recurrence) with the same signature. The chunked
version works on the chunk layout of `segments.py`: inside a chunk y is a causal
convolution with the kernel K[d] = sum_n C A^d B; chunk end states are carried
from chunk to chunk (the only sequential step, over chunks of one segment).

Shapes: u (B, L, H) real; A, B, C (H, N) (complex for S4D, real for EMA);
cu_seqlens (S+1,) int with B == 1, or None (S = B, one segment per row);
initial_state / final_state (S, H, N), dtype of A.
"""

from __future__ import annotations

import torch

from .segments import chunk_layout, segment_bounds
from .tree import segment_last, tree_lti_scan

DEFAULT_CHUNK = 64


def _check(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    if u.ndim != 3:
        raise ValueError(f"u must be (batch, length, channels), got shape {tuple(u.shape)}")
    if A.shape != B.shape or A.shape != C.shape or A.ndim != 2 or A.shape[0] != u.shape[-1]:
        raise ValueError(
            f"A, B, C must all be (channels={u.shape[-1]}, state), got {tuple(A.shape)}, {tuple(B.shape)}, {tuple(C.shape)}"
        )


def _lti_ref(u, A, B, C, cu_seqlens, initial_state):
    _check(u, A, B, C)
    batch, length, H = u.shape
    bounds = segment_bounds(batch, length, cu_seqlens, u.device).tolist()
    u_flat = u.reshape(batch * length, H).to(A.dtype)
    ys, finals = [], []
    for s in range(len(bounds) - 1):
        h = initial_state[s] if initial_state is not None else torch.zeros_like(A)
        for t in range(bounds[s], bounds[s + 1]):
            h = A * h + B * u_flat[t][:, None]
            ys.append((C * h).sum(-1))
        finals.append(h)
    y = torch.stack(ys, 0) if ys else u_flat.new_zeros((0, H))
    return y.reshape(batch, length, H), torch.stack(finals, 0)


def _lti_chunked(u, A, B, C, cu_seqlens, initial_state, chunk_size):
    _check(u, A, B, C)
    batch, length, H = u.shape
    q = chunk_size
    lay = chunk_layout(batch, length, cu_seqlens, q, u.device)
    S, N = lay.num_segments, A.shape[1]
    log_a = torch.log(A)  # A**d == exp(d log A) for integer d on any branch of the log
    d = torch.arange(q + 1, device=u.device, dtype=u.real.dtype if u.is_complex() else u.dtype)
    powers = torch.exp(d[:, None, None] * log_a)  # (Q+1, H, N): A**d
    uc = lay.to_chunks(u.reshape(batch * length, H)).to(A.dtype)  # (C, Q, H)

    # Inside a chunk: causal convolution with K[d] = sum_n C A^d B.
    kern = (powers[:q] * (B * C)).sum(-1)  # (Q, H)
    idx = torch.arange(q, device=u.device)
    lag = idx[:, None] - idx[None, :]
    toeplitz = kern[lag.clamp(min=0)] * (lag >= 0)[..., None]  # (Q, Q, H)
    y = torch.einsum("ijh,cjh->cih", toeplitz, uc)

    # Chunk end states from a zero start, then carried along each segment.
    chunk_state = torch.einsum("jhn,cjh->chn", powers[:q].flip(0) * B, uc)  # (C, H, N)
    grid_state = chunk_state[lay.grid_chunk]  # (S, K, H, N)
    first_decay = torch.exp((q - lay.seg_pad).to(d.dtype)[:, None, None] * log_a)  # (S, H, N)
    state = initial_state if initial_state is not None else A.new_zeros((S, H, N))
    ends, enters = [], []
    for k in range(lay.max_chunks):
        enters.append(state)
        state = grid_state[:, k] + (first_decay if k == 0 else powers[q]) * state
        ends.append(state)
    if lay.max_chunks:
        ends_t = torch.stack(ends, 1)
        enters_t = torch.stack(enters, 1)
        last = (lay.seg_num_chunks - 1).clamp(min=0)
        final = ends_t[torch.arange(S, device=u.device), last]
        start = initial_state if initial_state is not None else torch.zeros_like(final)
        final = torch.where((lay.seg_num_chunks > 0)[:, None, None], final, start)
        # State entering every chunk; first chunks of a segment are handled below.
        chunk_seg = torch.repeat_interleave(torch.arange(S, device=u.device), lay.seg_num_chunks)
        chunk_k = torch.arange(lay.num_chunks, device=u.device) - lay.seg_first_chunk[chunk_seg]
        enter = enters_t[chunk_seg, chunk_k] * (chunk_k > 0)[:, None, None]
        y = y + torch.einsum("chn,qhn->cqh", enter, powers[1:] * C)
        if initial_state is not None:
            # Initial state of a segment enters just before its first real token (after the pad).
            expo = idx[None, :] + 1 - lay.seg_pad[:, None]  # (S, Q)
            expo = torch.where(expo > 0, expo, torch.zeros_like(expo)).to(d.dtype)
            dec = torch.exp(expo[..., None, None] * log_a) * (expo > 0)[..., None, None]
            y_first = torch.einsum("sqhn,hn,shn->sqh", dec, C, initial_state)
            has = lay.seg_num_chunks > 0
            y = y.index_add(0, lay.seg_first_chunk[has], y_first[has])
    else:
        final = state
    return lay.from_chunks(y).reshape(batch, length, H), final


def _lti_tree(u, A, B, C, cu_seqlens, initial_state, tree):
    """Stack-structured rows (tree.py): h_t = A h_parent(t) + B u_t; final = state at each segment's last token."""
    _check(u, A, B, C)
    if initial_state is not None:
        raise NotImplementedError("an initial state (decoding cache) with stack-structured rows: decode them with models.backspace_decoding")
    batch, length, H = u.shape
    flat = u.reshape(batch * length, H).to(A.dtype)
    last = segment_last(batch, length, cu_seqlens)
    y, final = tree_lti_scan(flat, A, B, C, tree, last)
    return y.reshape(batch, length, H), final


def s4d_scan(u, A_bar, B_bar, C, cu_seqlens=None, initial_state=None, chunk_size=DEFAULT_CHUNK, tree=None):
    """Discretised diagonal S4 over conjugate pairs: y = 2 Re(sum_n C h).

    u (B, L, H) real; A_bar, B_bar, C (H, N/2) complex; initial_state (S, H, N/2) complex or None.
    Returns y (B, L, H) real (without the D skip term) and final_state (S, H, N/2) complex.
    tree: a `tree.StackTree` for stack-structured rows (None: plain rows, today's path).
    """
    if tree is not None:
        y, final = _lti_tree(u, A_bar, B_bar, C, cu_seqlens, initial_state, tree)
        return (2 * y.real).to(u.dtype), final
    y, final = _lti_chunked(u, A_bar, B_bar, C, cu_seqlens, initial_state, chunk_size)
    return (2 * y.real).to(u.dtype), final


def s4d_scan_ref(u, A_bar, B_bar, C, cu_seqlens=None, initial_state=None, chunk_size=DEFAULT_CHUNK, tree=None):
    """Sequential twin of `s4d_scan` (same shapes; chunk_size is ignored)."""
    if tree is not None:
        return s4d_scan(u, A_bar, B_bar, C, cu_seqlens, initial_state, chunk_size, tree)
    y, final = _lti_ref(u, A_bar, B_bar, C, cu_seqlens, initial_state)
    return (2 * y.real).to(u.dtype), final


def ema_scan(x, q, p_beta, gamma, cu_seqlens=None, initial_state=None, chunk_size=DEFAULT_CHUNK, tree=None):
    """MEGA's damped EMA: h_t = q h_{t-1} + p_beta x_t, y_t = sum_n gamma h_t.

    x (B, L, H); q (H, N) in (0, 1); p_beta, gamma (H, N); initial_state (S, H, N) or None.
    Returns y (B, L, H) (without the omega skip term) and final_state (S, H, N).
    tree: a `tree.StackTree` for stack-structured rows (None: plain rows, today's path).
    """
    if tree is not None:
        y, final = _lti_tree(x, q, p_beta, gamma, cu_seqlens, initial_state, tree)
        return y.to(x.dtype), final
    return _lti_chunked(x, q, p_beta, gamma, cu_seqlens, initial_state, chunk_size)


def ema_scan_ref(x, q, p_beta, gamma, cu_seqlens=None, initial_state=None, chunk_size=DEFAULT_CHUNK, tree=None):
    """Sequential twin of `ema_scan` (same shapes; chunk_size is ignored)."""
    if tree is not None:
        return ema_scan(x, q, p_beta, gamma, cu_seqlens, initial_state, chunk_size, tree)
    return _lti_ref(x, q, p_beta, gamma, cu_seqlens, initial_state)
