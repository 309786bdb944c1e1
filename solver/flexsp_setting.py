"""FlexSP's evaluation setting (REFERENCE.md section 2), for the benchmark and its test.

Wikipedia length sample, each length rounded up to a multiple of 128, rounded
lengths over 191,872 dropped, batches of 512 consecutive lengths, 64 ranks
with 30 GB each, group sizes 2, 4, 8, 16, 64, and the published results.
"""

from __future__ import annotations

from pathlib import Path

from .inputs import read_lengths_file

ROUND_TO = 128
MAX_LENGTH = 192_000 - 128
BATCH_SIZE = 512
NUM_BATCHES = 5
NUM_RANKS = 64
MEMORY_GB = 30.0
DEGREES = [2, 4, 8, 16, 64]
STATIC_FILL = 0.9
# FlexSP's published totals for the first 5 batches (s) and static size 64's.
PUBLISHED = {
    "7b": {"flexsp_total_s": 19.44, "static_s": 32.06, "lower_bound_s": 16.49},
    "13b": {"flexsp_total_s": 33.12, "static_s": 52.79, "lower_bound_s": 28.46},
    "30b": {"flexsp_total_s": 76.95, "static_s": 116.09, "lower_bound_s": 68.66},
}


def flexsp_batches(
    path: str | Path, num_batches: int = NUM_BATCHES, batch_size: int = BATCH_SIZE,
    round_to: int = ROUND_TO, max_length: int = MAX_LENGTH,
) -> list[list[int]]:
    """The first `num_batches` batches of FlexSP's setting from the lengths file at `path`."""
    lengths = read_lengths_file(path)
    rounded = [(n + round_to - 1) // round_to * round_to for n in lengths]
    kept = [n for n in rounded if n <= max_length]
    return [kept[k * batch_size : (k + 1) * batch_size] for k in range(num_batches)]
