"""Zigzag layout: coverage, disjointness, order, balance; all ranks looped in one process."""

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetsp.layout import chunk_owner, group_layouts, rank_chunks, shard_layout, zigzag_chunk_bounds


def test_no_torch_import():
    import subprocess

    code = "import sys, hetsp.layout; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunk_bounds_definition():
    assert zigzag_chunk_bounds(10, 2) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert zigzag_chunk_bounds(1, 3) == [(0, 0), (0, 0), (0, 0), (0, 0), (0, 0), (0, 1)]
    for s in (1, 2, 7, 13, 100):
        for d in (1, 2, 3, 5):
            b = zigzag_chunk_bounds(s, d)
            assert len(b) == 2 * d and b[0][0] == 0 and b[-1][1] == s
            assert all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
            assert all(e - st_ in (s // (2 * d), -(-s // (2 * d))) for st_, e in b)


def test_owner_and_rank_chunks_agree():
    for d in range(1, 7):
        for r in range(d):
            a, b = rank_chunks(r, d)
            assert chunk_owner(a, d) == r and chunk_owner(b, d) == r and a + b == 2 * d - 1


def test_small_example():
    lay = shard_layout([10, 3], 2, 1)
    # seq 0 (len 10): chunks 1=[2,5), 2=[5,7); seq 1 (len 3): chunks 1=[0,1), 2=[1,2)
    assert lay.positions == (2, 3, 4, 5, 6, 0, 1)
    assert lay.token_index == (2, 3, 4, 5, 6, 10, 11)
    assert lay.local_lengths == (5, 2)
    assert lay.cu_seqlens == (0, 5, 7)
    assert lay.chunks == ((0, 1, 2), (0, 2, 5), (1, 1, 0), (1, 2, 1))
    assert lay.first_half() == (0, 1, 2, 5) and lay.second_half() == (3, 4, 6)


def check_group(lengths, d):
    lays = group_layouts(lengths, d)
    total = sum(lengths)
    seen = sorted(i for lay in lays for i in lay.token_index)
    assert seen == list(range(total)), "tokens covered exactly once"
    starts = [0]
    for s in lengths:
        starts.append(starts[-1] + s)
    for lay in lays:
        assert len(lay.positions) == len(lay.token_index) == lay.num_tokens
        assert len(lay.cu_seqlens) == len(lengths) + 1 and lay.cu_seqlens[0] == 0
        assert len(lay.chunks) == 2 * len(lengths)
        for i, s in enumerate(lengths):
            lo, hi = lay.cu_seqlens[i], lay.cu_seqlens[i + 1]
            pos = lay.positions[lo:hi]
            assert list(pos) == sorted(pos), "positions increase inside a sequence"
            assert all(lay.token_index[j] == starts[i] + lay.positions[j] for j in range(lo, hi))
        for (seq, c, start), n, off in zip(lay.chunks, lay.piece_lengths, lay.piece_offsets):
            b = zigzag_chunk_bounds(lengths[seq], d)[c]
            assert (start, start + n) == b and chunk_owner(c, d) == lay.rank
            assert lay.positions[off : off + n] == tuple(range(b[0], b[1]))
    assert_zigzag_balance(lengths, [causal_work(lay.positions) for lay in lays])


def causal_work(positions):
    """Causal attention work of the tokens at `positions`: the query at position p sees p + 1 keys."""
    return sum(p + 1 for p in positions)


def assert_zigzag_balance(lengths, work):
    """The balance the zigzag split promises. With exact (real-valued) chunk boundaries c s / 2d,
    rank r's two chunks r and 2d-1-r carry exactly s (s + 1) / 2d work. Rounding the boundaries
    down moves less than one token across each boundary, so each sequence adds at most s to the
    spread between the busiest and the idlest rank (tight: s = 1 on d = 2). A contiguous split
    of s tokens into d pieces has a spread near s^2 (d - 1) / d^2 and fails this."""
    assert sum(work) == sum(s * (s + 1) // 2 for s in lengths)
    assert max(work) - min(work) <= sum(lengths), (lengths, work)


def contiguous_split(lengths, d):
    """Positions per rank when each sequence is cut into d contiguous pieces (no zigzag)."""
    out = [[] for _ in range(d)]
    for s in lengths:
        for r in range(d):
            out[r] += range(r * s // d, (r + 1) * s // d)
    return out


def test_zigzag_balance_bound_holds_exhaustively_and_is_tight():
    for d in range(1, 9):
        for s in range(1, 400):
            assert_zigzag_balance([s], [causal_work(lay.positions) for lay in group_layouts([s], d)])
    work = [causal_work(lay.positions) for lay in group_layouts([1], 2)]
    assert max(work) - min(work) == 1  # the bound s is reached


@pytest.mark.parametrize("d", [2, 3, 4, 5])
@pytest.mark.parametrize("lengths", [[100, 1, 97, 4], [13, 1, 2], [1000] + [1] * 200, [60, 60, 60]])
def test_a_contiguous_split_fails_the_balance_check(lengths, d):
    """The balance check is not vacuous: the plain split a layout without zigzag would use fails it."""
    with pytest.raises(AssertionError):
        assert_zigzag_balance(lengths, [causal_work(p) for p in contiguous_split(lengths, d)])


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5])
def test_groups_fixed(d):
    for lengths in ([1], [1, 1, 1], [2], [7], [13, 1, 2], [3] * 5, [100, 1, 97, 4], [1000] + [1] * 200):
        check_group(lengths, d)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=8), st.integers(1, 6))
def test_groups_random(lengths, d):
    check_group(lengths, d)


def test_balance_is_even_for_divisible_lengths():
    lays = group_layouts([64, 32], 4)
    work = {causal_work(lay.positions) for lay in lays}
    assert len(work) == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="length"):
        shard_layout([3, 0], 2, 0)
    with pytest.raises(ValueError, match="outside the group"):
        shard_layout([3], 2, 2)
    with pytest.raises(ValueError, match="group_size"):
        shard_layout([3], 0, 0)
    with pytest.raises(ValueError, match="chunk"):
        chunk_owner(4, 2)
