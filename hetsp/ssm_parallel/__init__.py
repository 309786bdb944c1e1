"""Sequence parallelism for state-space and convolution layers (REFERENCE.md section 5).

`parallelize(model)` is applied once from outside; afterwards a forward with
``hetsp_shard=ctx`` (a `hetsp.attention.ShardContext`) runs every SSM scan and
causal convolution of the model over the group's zigzag shards: local scans
from a zero state, one exchange of per-chunk (decay, state) summaries, a
correction with the incoming state; convolution halos point to point.
"""

from hetsp.ssm_parallel.comm import GroupSpec, group_all_gather, halo_exchange
from hetsp.ssm_parallel.conv import causal_conv1d_sp
from hetsp.ssm_parallel.parallelize import parallelize
from hetsp.ssm_parallel.segments import Segments, halo_routes, local_segments, segments_of
from hetsp.ssm_parallel.ssd import ssd_scan_sp
from hetsp.ssm_parallel.state import pass_states

__all__ = [
    "GroupSpec",
    "Segments",
    "causal_conv1d_sp",
    "group_all_gather",
    "halo_exchange",
    "halo_routes",
    "local_segments",
    "parallelize",
    "pass_states",
    "segments_of",
    "ssd_scan_sp",
]
