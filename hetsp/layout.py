"""Which tokens of a group's packed sequences each rank of the group holds.

Zigzag split (causal load balance, see REFERENCE.md section 1): a sequence
of length s on a group of d ranks is cut into 2d chunks,
chunk c = [floor(c s / 2d), floor((c + 1) s / 2d)), and rank r holds chunks
r and 2d-1-r. Under a causal mask every rank then does the same work. A
rank's tokens are ordered by sequence, then chunk r before chunk 2d-1-r;
chunks may be empty (short sequences) and there is never padding.

Everything here is a pure function of (lengths, group size, rank): no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


def _check(lengths: tuple[int, ...], group_size: int, rank: int | None = None) -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rank is not None and not (0 <= rank < group_size):
        raise ValueError(f"rank {rank} is outside the group of size {group_size}; pass the rank within the group (0..{group_size - 1})")
    for i, s in enumerate(lengths):
        if not isinstance(s, int) or s < 1:
            raise ValueError(f"lengths[{i}] = {s!r}: every sequence length must be an int >= 1")


def zigzag_chunk_bounds(length: int, group_size: int) -> list[tuple[int, int]]:
    """The 2*group_size chunks [start, end) of a sequence of `length` tokens (some may be empty)."""
    _check((length,), group_size)
    n = 2 * group_size
    return [(c * length // n, (c + 1) * length // n) for c in range(n)]


def rank_chunks(rank: int, group_size: int) -> tuple[int, int]:
    """The two chunk indices rank `rank` holds, in local order: (rank, 2d-1-rank)."""
    _check((), group_size, rank)
    return rank, 2 * group_size - 1 - rank


def chunk_owner(chunk: int, group_size: int) -> int:
    """The rank in the group that holds chunk `chunk` (0 <= chunk < 2*group_size)."""
    if not (0 <= chunk < 2 * group_size):
        raise ValueError(f"chunk {chunk} out of range for group_size {group_size} (0..{2 * group_size - 1})")
    return chunk if chunk < group_size else 2 * group_size - 1 - chunk


@dataclass(frozen=True)
class ShardLayout:
    """The tokens one rank of a group holds.

    lengths:        the group's sequence lengths, in order.
    group_size:     d, ranks in the group.
    rank:           this rank's index in the group.
    token_index:    for each local token, its index in the packed concatenation of all `lengths`.
    positions:      for each local token, its position inside its own sequence (for RoPE).
    local_lengths:  local tokens of each sequence (may be 0).
    cu_seqlens:     local cumulative lengths, len(lengths) + 1 entries, starting at 0.
    chunks:         (sequence index, chunk index, start position in sequence) of each local
                    piece, in local order: exactly two per sequence (chunk r, then chunk 2d-1-r),
                    empty pieces included so that piece 2i and 2i+1 belong to sequence i.
    piece_lengths:  tokens in each entry of `chunks` (may be 0).
    piece_offsets:  local offset where each entry of `chunks` starts.
    """

    lengths: tuple[int, ...]
    group_size: int
    rank: int
    token_index: tuple[int, ...]
    positions: tuple[int, ...]
    local_lengths: tuple[int, ...]
    cu_seqlens: tuple[int, ...]
    chunks: tuple[tuple[int, int, int], ...]
    piece_lengths: tuple[int, ...]
    piece_offsets: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        """Tokens this rank holds."""
        return self.cu_seqlens[-1]

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def max_seqlen(self) -> int:
        """Largest local length of a sequence (0 if the rank holds nothing)."""
        return max(self.local_lengths, default=0)

    def first_half(self) -> tuple[int, ...]:
        """Local indices of the tokens of chunk `rank` of every sequence (the 'early' halves)."""
        return tuple(i for p in range(0, len(self.chunks), 2) for i in range(self.piece_offsets[p], self.piece_offsets[p] + self.piece_lengths[p]))

    def second_half(self) -> tuple[int, ...]:
        """Local indices of the tokens of chunk 2d-1-rank of every sequence (the 'late' halves)."""
        return tuple(i for p in range(1, len(self.chunks), 2) for i in range(self.piece_offsets[p], self.piece_offsets[p] + self.piece_lengths[p]))

    def first_half_lengths(self) -> tuple[int, ...]:
        """Per sequence, tokens in chunk `rank`."""
        return self.piece_lengths[0::2]

    def second_half_lengths(self) -> tuple[int, ...]:
        """Per sequence, tokens in chunk 2d-1-rank."""
        return self.piece_lengths[1::2]


def shard_layout(lengths, group_size: int, rank: int) -> ShardLayout:
    """The `ShardLayout` of rank `rank` (in the group) for the group's sequences `lengths`."""
    lengths = tuple(lengths)
    _check(lengths, group_size, rank)
    token_index: list[int] = []
    positions: list[int] = []
    local_lengths: list[int] = []
    chunks: list[tuple[int, int, int]] = []
    piece_lengths: list[int] = []
    piece_offsets: list[int] = []
    offset = 0
    for seq, s in enumerate(lengths):
        bounds = zigzag_chunk_bounds(s, group_size)
        n_local = 0
        for c in rank_chunks(rank, group_size):
            start, end = bounds[c]
            chunks.append((seq, c, start))
            piece_offsets.append(len(token_index))
            piece_lengths.append(end - start)
            positions.extend(range(start, end))
            token_index.extend(range(offset + start, offset + end))
            n_local += end - start
        local_lengths.append(n_local)
        offset += s
    cu = [0]
    for n in local_lengths:
        cu.append(cu[-1] + n)
    return ShardLayout(
        lengths=lengths,
        group_size=group_size,
        rank=rank,
        token_index=tuple(token_index),
        positions=tuple(positions),
        local_lengths=tuple(local_lengths),
        cu_seqlens=tuple(cu),
        chunks=tuple(chunks),
        piece_lengths=tuple(piece_lengths),
        piece_offsets=tuple(piece_offsets),
    )


def group_layouts(lengths, group_size: int) -> list[ShardLayout]:
    """The layouts of every rank of the group, rank 0 first."""
    return [shard_layout(lengths, group_size, r) for r in range(group_size)]
