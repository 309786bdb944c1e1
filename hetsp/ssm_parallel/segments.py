"""Which zigzag chunks a rank holds, and where the tokens they need live.

Pure functions of (sequence lengths, group size, rank in group): no torch.
Chunk c of a length-s sequence is ``[floor(c s / 2d), floor((c+1) s / 2d))``;
rank r holds chunks r and 2d-1-r, its tokens ordered by sequence, then chunk
r before chunk 2d-1-r (the layout of `hetsp.layout`). A rank's *segments* are
its local chunks in that order (two per sequence, possibly empty): each one
is a contiguous run of a document, so a recurrence restarts at every segment
and is corrected with the state flowing in from the chunks before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from hetsp.layout import chunk_owner, shard_layout, zigzag_chunk_bounds


def chunk_slot(chunk: int, group_size: int) -> int:
    """0 when `chunk` is its holder's first chunk of a sequence, 1 when the second."""
    return 0 if chunk < group_size else 1


@dataclass(frozen=True)
class Segments:
    """A rank's local chunks, in local token order (sequence, then slot 0, slot 1).

    Entry k describes segment k: ``seq[k]`` (sequence index in the group),
    ``chunk[k]`` (zigzag chunk index), ``start[k]`` (first position within the
    sequence), ``length[k]`` and ``offset[k]`` (first local token index).
    """

    lengths: tuple[int, ...]
    group_size: int
    rank: int
    seq: tuple[int, ...]
    chunk: tuple[int, ...]
    start: tuple[int, ...]
    length: tuple[int, ...]
    offset: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.length)

    @property
    def num_segments(self) -> int:
        return len(self.seq)

    def cu_seqlens(self) -> list[int]:
        """Segment boundaries in local token indices (length num_segments + 1)."""
        return list(self.offset) + [self.num_tokens]


@lru_cache(maxsize=256)
def local_segments(lengths: tuple[int, ...], group_size: int, rank: int) -> Segments:
    """The segments rank `rank` of a `group_size` group holds for `lengths` (from `hetsp.layout`)."""
    lay = shard_layout(lengths, group_size, rank)
    return Segments(
        lay.lengths,
        group_size,
        rank,
        tuple(c[0] for c in lay.chunks),
        tuple(c[1] for c in lay.chunks),
        tuple(c[2] for c in lay.chunks),
        lay.piece_lengths,
        lay.piece_offsets,
    )


def segments_of(shard) -> Segments:
    """The segments of a `hetsp.attention.ShardContext` (or anything with a `layout`)."""
    lay = getattr(shard, "layout", None)
    if lay is None or not hasattr(lay, "lengths"):
        raise ValueError(
            f"hetsp_shard of type {type(shard).__name__} has no layout with the group's sequence lengths; "
            "build it with hetsp.attention.make_shard_context(lengths, group_start, group_size, rank, device)"
        )
    return local_segments(tuple(lay.lengths), int(lay.group_size), int(lay.rank))


@dataclass(frozen=True)
class HaloRoutes:
    """Where the `width` tokens before each local segment come from.

    The halo buffer of a rank has ``num_segments * width`` rows: row
    ``k * width + j`` holds the token ``width - j`` positions before segment
    k's start (zero when that lies before the document start, or when the
    segment is empty). ``recv[src]`` lists (halo row, local index on src) of
    rows filled from rank `src` (src may be this rank: a local copy);
    ``send[dst]`` lists the local indices this rank sends to `dst`, in the
    order `dst` lists them in its ``recv[this rank]``.
    """

    width: int
    num_rows: int
    recv: dict[int, tuple[tuple[int, int], ...]]
    send: dict[int, tuple[int, ...]]


def _needed(lengths: tuple[int, ...], group_size: int, rank: int, width: int) -> dict[int, list[tuple[int, int]]]:
    """For `rank`: source rank -> [(halo row, local index on source)]."""
    seg = local_segments(lengths, group_size, rank)
    out: dict[int, list[tuple[int, int]]] = {}
    for k in range(seg.num_segments):
        if seg.length[k] == 0:
            continue
        i, a = seg.seq[k], seg.start[k]
        bounds = zigzag_chunk_bounds(lengths[i], group_size)
        for j in range(width):
            p = a - width + j
            if p < 0:
                continue
            c = next(c for c, (lo, hi) in enumerate(bounds) if lo <= p < hi)
            src = chunk_owner(c, group_size)
            src_seg = local_segments(lengths, group_size, src)
            kk = 2 * i + chunk_slot(c, group_size)
            assert src_seg.chunk[kk] == c and src_seg.seq[kk] == i
            out.setdefault(src, []).append((k * width + j, src_seg.offset[kk] + p - bounds[c][0]))
    return out


@lru_cache(maxsize=256)
def halo_routes(lengths: tuple[int, ...], group_size: int, rank: int, width: int) -> HaloRoutes:
    """The point-to-point plan of a causal convolution's halo (width = kernel size - 1)."""
    recv = {src: tuple(rows) for src, rows in _needed(lengths, group_size, rank, width).items()}
    send: dict[int, tuple[int, ...]] = {}
    for dst in range(group_size):
        if dst == rank:
            continue
        rows = _needed(lengths, group_size, dst, width).get(rank, [])
        if rows:
            send[dst] = tuple(idx for _, idx in rows)
    num_rows = local_segments(lengths, group_size, rank).num_segments * width
    return HaloRoutes(width, num_rows, recv, send)
