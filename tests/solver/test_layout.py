"""Groups to rank ranges: disjoint, in range, and inside one node whenever the sizes allow it."""

from hypothesis import given, settings
from hypothesis import strategies as st

from solver.layout import place_groups


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(0, 16), st.data())
def test_place_groups(num_ranks, rpn, data):
    rpn = min(rpn, num_ranks)
    sizes = []
    left = num_ranks
    while left and data.draw(st.booleans()):
        n = data.draw(st.integers(1, left))
        sizes.append(n)
        left -= n
    starts = place_groups(sizes, num_ranks, rpn)
    used = [False] * num_ranks
    for a, n in zip(starts, sizes):
        assert 0 <= a and a + n <= num_ranks
        for r in range(a, a + n):
            assert not used[r]
            used[r] = True


def test_small_groups_stay_in_nodes():
    # powers of two on 8-rank nodes never straddle a node boundary
    sizes = [2, 8, 4, 1, 1, 16, 2, 8, 4, 2, 2, 2]
    starts = place_groups(sizes, 64, 8)
    for a, n in zip(starts, sizes):
        if n <= 8:
            assert a // 8 == (a + n - 1) // 8, (a, n)
        else:
            assert a % 8 == 0
