"""Sequence kernels of the SSM mixers, swappable from outside the model.

Every mixer looks its kernels up at call time in its own ``kernels`` mapping,
a copy of `KERNELS` unless `HybridForCausalLM.set_kernels` replaced entries, so
sequence parallelism can wrap them (state passing, conv halos, SeqBoat prefix
gathering) without copying model code. Each kernel has a `_ref` twin with the
same signature; shapes are in the docstrings of the modules below.

  "s4d_scan"(u, A_bar, B_bar, C, cu_seqlens=None, initial_state=None) -> (y, final_state)
  "ema_scan"(x, q, p_beta, gamma, cu_seqlens=None, initial_state=None) -> (y, final_state)
  "ssd_scan"(x, dt, A, B, C, chunk_size, cu_seqlens=None, initial_states=None) -> (y, final_states)
  "causal_conv1d"(x, weight, bias, cu_seqlens=None, halo=None) -> y
  "local_attention"(q, k, v, seg, window, scale, prefix_k=None, prefix_v=None, prefix_seg=None) -> o
"""

from .conv import causal_conv1d, causal_conv1d_ref, conv_tail
from .local_attention import local_attention, local_attention_ref
from .lti import ema_scan, ema_scan_ref, s4d_scan, s4d_scan_ref
from .segments import chunk_layout, positions_in_segment, segment_bounds, segment_ids
from .ssd import ssd_chunk_scan, ssd_chunk_scan_ref, ssd_intra, ssd_intra_torch

KERNELS = {
    "s4d_scan": s4d_scan,
    "ema_scan": ema_scan,
    "ssd_scan": ssd_chunk_scan,
    "causal_conv1d": causal_conv1d,
    "local_attention": local_attention,
}

REFERENCE_KERNELS = {
    "s4d_scan": s4d_scan_ref,
    "ema_scan": ema_scan_ref,
    "ssd_scan": ssd_chunk_scan_ref,
    "causal_conv1d": causal_conv1d_ref,
    "local_attention": local_attention_ref,
}

__all__ = [
    "KERNELS",
    "REFERENCE_KERNELS",
    "causal_conv1d",
    "causal_conv1d_ref",
    "chunk_layout",
    "conv_tail",
    "ema_scan",
    "ema_scan_ref",
    "local_attention",
    "local_attention_ref",
    "positions_in_segment",
    "s4d_scan",
    "s4d_scan_ref",
    "segment_bounds",
    "segment_ids",
    "ssd_chunk_scan",
    "ssd_chunk_scan_ref",
    "ssd_intra",
    "ssd_intra_torch",
]
