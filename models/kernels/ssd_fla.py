"""The SSD scan on flash-linear-attention's chunked Triton kernels (`fla-core`), same contract
as `ssd.ssd_chunk_scan` (shapes there); its reference twin is `ssd.ssd_chunk_scan_ref`.

Mamba-2's SSD is simple GLA with one scalar decay per head: state = exp(g) state + k^T v,
y = q state, with q = C, k = B (groups repeated to heads), v = dt x, g = dt A and scale 1.
fla keeps the state as (V, K) = (P, N) with ``state_v_first=True``, hetsp's own layout.
fla's chunk length is its own (64); `chunk_size` is accepted for the common signature.
Only for CUDA (Triton). Not selected by default: `bench/gpu_check.sh` compares it with
hetsp's scan against the fp64 twin, and a hybrid model uses it only when its config says
``ssd_kernel = "fla"`` (``model.extra.ssd_kernel`` in a run config).
"""

from __future__ import annotations

import torch

from .ssd import DEFAULT_CHUNK, _check, _heads


def fla_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("fla") is not None


def ssd_chunk_scan_fla(x, dt, A, B, C, chunk_size=DEFAULT_CHUNK, cu_seqlens=None, initial_states=None):
    """Returns y (B, L, H, P) and final_states (S, H, P, N), like `ssd_chunk_scan`."""
    _check(x, dt, A, B, C)
    if not x.is_cuda:
        raise ValueError(f"ssd_chunk_scan_fla runs on CUDA tensors only, got {x.device}; use ssd_chunk_scan (ssd_kernel = 'hetsp')")
    if not fla_available():
        raise ValueError("ssd_chunk_scan_fla needs flash-linear-attention (pip install fla-core); use ssd_chunk_scan")
    from fla.ops.simple_gla import chunk_simple_gla

    batch, length, H, P = x.shape
    N = B.shape[3]
    q, k = _heads(C, H), _heads(B, H)
    v = x * dt[..., None]
    g = dt * A
    if cu_seqlens is None:
        y, final = chunk_simple_gla(q, k, v, g=g, scale=1.0, initial_state=initial_states,
                                    output_final_state=True, state_v_first=True)
        return y, final
    if batch != 1:
        raise ValueError(f"cu_seqlens needs x of batch 1 (packed sequences), got batch {batch}")
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]
    keep = lens > 0  # fla's varlen kernels take no empty sequence: those pass their state through
    cu_kept = torch.cat([cu.new_zeros(1), torch.cumsum(lens[keep], 0)])
    init_kept = initial_states[keep] if initial_states is not None else None
    y, final_kept = chunk_simple_gla(q, k, v, g=g, scale=1.0, initial_state=init_kept, output_final_state=True,
                                     state_v_first=True, cu_seqlens=cu_kept)
    S = len(lens)
    final = initial_states.clone() if initial_states is not None else x.new_zeros((S, H, P, N))
    final = final.to(final_kept.dtype).index_put((keep.nonzero().flatten(),), final_kept)
    return y, final
