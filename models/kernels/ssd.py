"""Mamba-2 state space duality (SSD) scan with one scalar decay per head.

Per head h (group g = h // (H / G)), with resets at segment starts:

    state[t] = exp(dt[t, h] A[h]) state[t-1] + dt[t, h] x[t, h] B[t, g]^T      state: (P, N)
    y[t, h]  = state[t] C[t, g]

Legend: B rows, L tokens, H heads, P head dim, G groups, N state size, S segments,
C chunks, Q chunk size. Shapes: x (B, L, H, P); dt (B, L, H) positive (after
softplus); A (H,) negative; B, C (B, L, G, N); cu_seqlens (S+1,) with B == 1 or
None (S = B); initial_states / final_states (S, H, P, N). y excludes the D skip.

`ssd_chunk_scan` runs the chunked algorithm on the layout of `segments.py`:
(1) inside each chunk y = (exp(segsum) * C B^T) x  (`ssd_intra`, Triton on CUDA);
(2) each chunk's end state from zero; (3) states carried along each segment;
(4) y += exp(cumsum) C state_in. `ssd_chunk_scan_ref` is the sequential twin.
"""

from __future__ import annotations

import logging

import torch

from .segments import chunk_layout, segment_bounds
from .tree import segment_last, tree_ssd_scan

log = logging.getLogger(__name__)
DEFAULT_CHUNK = 64
_LOGGED: set[str] = set()


def _check(x, dt, A, B, C):
    if x.ndim != 4 or dt.shape != x.shape[:3] or A.shape != (x.shape[2],):
        raise ValueError(
            f"expected x (B, L, H, P), dt (B, L, H), A (H,); got {tuple(x.shape)}, {tuple(dt.shape)}, {tuple(A.shape)}"
        )
    if B.shape != C.shape or B.ndim != 4 or B.shape[:2] != x.shape[:2] or x.shape[2] % B.shape[2]:
        raise ValueError(
            f"expected B, C (B, L, G, N) with G dividing the {x.shape[2]} heads; got {tuple(B.shape)}, {tuple(C.shape)}"
        )


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., G, N) -> (..., H, N): head h reads group h // (H / G)."""
    return t.repeat_interleave(num_heads // t.shape[-2], dim=-2)


def ssd_intra_torch(x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Zero-start scan inside each chunk.

    x (C, Q, H, P), log_a (C, Q, H), B, C (C, Q, G, N) -> y (C, Q, H, P) with
    y[i] = sum_{j <= i} exp(sum_{j < u <= i} log_a[u]) (C[i] . B[j]) x[j].
    """
    q, H = x.shape[1], x.shape[2]
    cs = torch.cumsum(log_a, 1)
    diff = cs[:, :, None, :] - cs[:, None, :, :]  # (C, i, j, H)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()[None, :, :, None]
    decay = torch.exp(torch.where(causal, diff, torch.full_like(diff, float("-inf"))))
    cb = torch.einsum("cign,cjgn->cijg", C, B)
    cb = cb.repeat_interleave(H // B.shape[2], dim=-1)
    return torch.einsum("cijh,cjhp->cihp", decay * cb, x)


class SSDIntra(torch.autograd.Function):
    """`ssd_intra` with a hand-written backward made of three more forward calls.

    With P[i, j] the (i, j) term of y[i] . dy[i]:
      dx  = reversed scan of dy with B and C swapped;
      dC  = scan with x as keys and dy as queries; dB = the reversed mirror of it;
      dlog_a[u] = sum over pairs j < u <= i of P = reverse cumsum of (dy . y - dx . x).
    The forward implementation is pluggable (Triton on CUDA, torch for testing).
    """

    @staticmethod
    def forward(ctx, x, log_a, B, C, impl):
        y = impl(x, log_a, B, C)
        ctx.save_for_backward(x, log_a, B, C, y)
        ctx.impl = impl
        return y

    @staticmethod
    def backward(ctx, dy):
        x, log_a, B, C, y = ctx.saved_tensors
        impl = ctx.impl
        H, G = x.shape[2], B.shape[2]
        dy = dy.contiguous()

        def rev(t):
            return t.flip(1).contiguous()

        # exp(sum over (j, i]) in reversed time needs log_a shifted by one step.
        log_a_rev = torch.cat([torch.zeros_like(log_a[:, :1]), log_a.flip(1)[:, :-1]], 1).contiguous()
        dx = rev(impl(rev(dy), log_a_rev, rev(C), rev(B)))
        Bh, Ch = _heads(B, H).contiguous(), _heads(C, H).contiguous()
        dC_h = impl(Bh, log_a, x.contiguous(), dy)  # heads act as groups: keys x, queries dy
        dB_h = rev(impl(rev(Ch), log_a_rev, rev(dy), rev(x)))
        fold = H // G
        dC = dC_h.reshape(*dC_h.shape[:2], G, fold, -1).sum(3)
        dB = dB_h.reshape(*dB_h.shape[:2], G, fold, -1).sum(3)
        pair = (dy * y).sum(-1) - (dx * x).sum(-1)  # (C, Q, H)
        dlog_a = pair.flip(1).cumsum(1).flip(1)
        return dx, dlog_a, dB, dC, None


def ssd_intra(x, log_a, B, C, impl=None):
    """Dispatch: `impl` None runs plain torch under autograd; otherwise `SSDIntra` with `impl`."""
    if impl is None:
        return ssd_intra_torch(x, log_a, B, C)
    return SSDIntra.apply(x.contiguous(), log_a.contiguous(), B.contiguous(), C.contiguous(), impl)


def _default_impl(x: torch.Tensor):
    if x.is_cuda and x.dtype != torch.float32:
        _log_once("cuda-dtype", f"SSD chunk scan: torch chunked path on CUDA for {x.dtype} (Triton kernel runs fp32)")
        return None
    if x.is_cuda:
        try:
            from .ssd_triton import ssd_intra_triton
        except ImportError as err:  # pragma: no cover - depends on the install
            _log_once("torch", f"SSD chunk scan: Triton unavailable ({err}); running the torch chunked path on CUDA")
            return None
        _log_once("triton", "SSD chunk scan: Triton kernel (forward and backward) on CUDA")
        return ssd_intra_triton
    _log_once("cpu", "SSD chunk scan: torch chunked path (no CUDA)")
    return None


def _log_once(key: str, msg: str) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(msg)


_AUTO = object()


def _ssd_tree(x, dt, A, B, C, cu_seqlens, initial_states, tree):
    """Stack-structured rows (tree.py): h_t = exp(dt_t A) h_parent(t) + dt_t x_t B_t^T."""
    if initial_states is not None:
        raise NotImplementedError("an initial state (decoding cache) with stack-structured rows: decode them with models.backspace_decoding")
    batch, length, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    flat = batch * length
    dtf = dt.reshape(flat, H)
    Bh = _heads(B.reshape(flat, G, N), H)
    Ch = _heads(C.reshape(flat, G, N), H)
    last = segment_last(batch, length, cu_seqlens)
    y, final = tree_ssd_scan(dtf * A, dtf[..., None] * x.reshape(flat, H, P), Bh, Ch, tree, last)
    return y.reshape(batch, length, H, P), final


def ssd_chunk_scan(x, dt, A, B, C, chunk_size=DEFAULT_CHUNK, cu_seqlens=None, initial_states=None, intra_impl=_AUTO, tree=None):
    """Chunked SSD scan. Returns y (B, L, H, P) and final_states (S, H, P, N).

    intra_impl: the within-chunk kernel; default Triton on CUDA, torch on CPU.
    tree: a `tree.StackTree` for stack-structured rows (None: plain rows, today's path).
    """
    _check(x, dt, A, B, C)
    if tree is not None:
        return _ssd_tree(x, dt, A, B, C, cu_seqlens, initial_states, tree)
    batch, length, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    impl = _default_impl(x) if intra_impl is _AUTO else intra_impl
    lay = chunk_layout(batch, length, cu_seqlens, chunk_size, x.device)
    S = lay.num_segments
    flat = batch * length
    # Pads get log_a = 0 (decay 1) and zero input, so an initial state passes through them untouched.
    xc = lay.to_chunks((x * dt[..., None]).reshape(flat, H, P))
    la = lay.to_chunks((dt * A).reshape(flat, H))
    Bc = lay.to_chunks(B.reshape(flat, G, N))
    Cc = lay.to_chunks(C.reshape(flat, G, N))
    y = ssd_intra(xc, la, Bc, Cc, impl)

    cs = torch.cumsum(la, 1)  # (C, Q, H)
    Bh = _heads(Bc, H)
    to_end = torch.exp(cs[:, -1:, :] - cs)  # decay from each token to its chunk's end
    chunk_state = torch.einsum("cqh,cqhp,cqhn->chpn", to_end, xc, Bh)
    chunk_decay = torch.exp(cs[:, -1])  # (C, H)
    grid_state = chunk_state[lay.grid_chunk]
    grid_decay = chunk_decay[lay.grid_chunk]
    state = initial_states if initial_states is not None else x.new_zeros((S, H, P, N))
    ends, enters = [], []
    for k in range(lay.max_chunks):
        enters.append(state)
        state = grid_state[:, k] + grid_decay[:, k, :, None, None] * state
        ends.append(state)
    if lay.max_chunks:
        ends_t, enters_t = torch.stack(ends, 1), torch.stack(enters, 1)
        final = ends_t[torch.arange(S, device=x.device), (lay.seg_num_chunks - 1).clamp(min=0)]
        start = initial_states if initial_states is not None else torch.zeros_like(final)
        final = torch.where((lay.seg_num_chunks > 0)[:, None, None, None], final, start)
        chunk_seg = torch.repeat_interleave(torch.arange(S, device=x.device), lay.seg_num_chunks)
        chunk_k = torch.arange(lay.num_chunks, device=x.device) - lay.seg_first_chunk[chunk_seg]
        enter = enters_t[chunk_seg, chunk_k]  # (C, H, P, N)
        Ch = _heads(Cc, H)
        y = y + torch.einsum("cqhn,chpn->cqhp", Ch, enter) * torch.exp(cs)[..., None]
    else:
        final = state
    return lay.from_chunks(y).reshape(batch, length, H, P), final


def ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=DEFAULT_CHUNK, cu_seqlens=None, initial_states=None, tree=None):
    """Sequential twin of `ssd_chunk_scan` (same shapes; chunk_size is ignored)."""
    _check(x, dt, A, B, C)
    if tree is not None:
        return _ssd_tree(x, dt, A, B, C, cu_seqlens, initial_states, tree)
    batch, length, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    bounds = segment_bounds(batch, length, cu_seqlens, x.device).tolist()
    flat = batch * length
    xf, dtf = x.reshape(flat, H, P), dt.reshape(flat, H)
    Bf, Cf = _heads(B.reshape(flat, G, N), H), _heads(C.reshape(flat, G, N), H)
    ys, finals = [], []
    for s in range(len(bounds) - 1):
        h = initial_states[s] if initial_states is not None else x.new_zeros((H, P, N))
        for t in range(bounds[s], bounds[s + 1]):
            decay = torch.exp(dtf[t] * A)[:, None, None]
            h = decay * h + (dtf[t][:, None] * xf[t])[:, :, None] * Bf[t][:, None, :]
            ys.append(torch.einsum("hpn,hn->hp", h, Cf[t]))
        finals.append(h)
    y = torch.stack(ys, 0) if ys else x.new_zeros((0, H, P))
    return y.reshape(batch, length, H, P), torch.stack(finals, 0)
