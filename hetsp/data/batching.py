"""Global batches cut by a token budget, with random access by step.

Epoch e visits the training sequences in the order ``permutation(seed, e)`` and cuts
that order greedily into batches: a batch takes sequences while its total stays within
the budget. Step s belongs to the epoch whose batch range contains it; finding it needs
only the batch counts of the epochs before (each a cheap cut), never the data itself,
so every rank computes the same batch from (seed, step) and resuming needs no replay.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


def epoch_order(seed: int, epoch: int, num_sequences: int) -> np.ndarray:
    """The shuffled sequence order of one epoch: (num_sequences,) int64."""
    return np.random.default_rng([seed, epoch]).permutation(num_sequences)


def cut_by_budget(lengths: np.ndarray, budget: int) -> np.ndarray:
    """Greedy budget cut of sequences taken in the given order.

    lengths: (n,) each <= budget. Returns bounds (num_batches + 1,) int64: batch k is
    positions ``bounds[k]:bounds[k+1]``; every batch is non-empty and sums to <= budget.
    """
    bounds = [0]
    total = 0
    for i, n in enumerate(lengths.tolist()):
        if n > budget:
            raise ValueError(f"sequence of {n} tokens exceeds the batch budget of {budget} tokens")
        if total + n > budget:
            bounds.append(i)
            total = 0
        total += n
    if len(lengths):
        bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


class EpochSchedule:
    """Maps a step to the indices of its sequences; pure function of (lengths, budget, seed, step).

    Thread-safe: the training loop may ask for a later step's batch from a planning thread.
    """

    def __init__(self, lengths: np.ndarray, budget: int, seed: int, cache_epochs: int = 4) -> None:
        if len(lengths) == 0:
            raise ValueError("no training sequences to batch")
        self.lengths = lengths
        self.budget = budget
        self.seed = seed
        self._first_step = [0]  # _first_step[e]: first step of epoch e (known for e < len)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_epochs = cache_epochs
        self._lock = threading.RLock()

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, bounds) of one epoch, cached for the few most recent epochs."""
        with self._lock:
            return self._epoch_locked(epoch)

    def _epoch_locked(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch in self._cache:
            self._cache.move_to_end(epoch)
            return self._cache[epoch]
        order = epoch_order(self.seed, epoch, len(self.lengths))
        bounds = cut_by_budget(self.lengths[order], self.budget)
        self._cache[epoch] = (order, bounds)
        if len(self._cache) > self._cache_epochs:
            self._cache.popitem(last=False)
        return order, bounds

    def epoch_of(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        with self._lock:
            while self._first_step[-1] <= step:
                e = len(self._first_step) - 1
                _, bounds = self._epoch_locked(e)
                self._first_step.append(self._first_step[-1] + len(bounds) - 1)
            # _first_step is ascending: the epoch is the last e with _first_step[e] <= step.
            return int(np.searchsorted(self._first_step, step, side="right") - 1)

    def batches_in_epoch(self, epoch: int) -> int:
        return len(self._epoch(epoch)[1]) - 1

    def indices(self, step: int) -> np.ndarray:
        """Sequence indices of the global batch of `step`, in batch order: (k,) int64."""
        with self._lock:
            e = self.epoch_of(step)
            order, bounds = self._epoch_locked(e)
            k = step - self._first_step[e]
            return order[bounds[k] : bounds[k + 1]]
