"""Local search on a packed batch: move, swap and regroup sequences while the step time drops.

Works on `MicroBatchLoad` lists from `pack.py` with a `CostTable` (per-sequence
times; for non-additive models these are the upper bounds the MILP also uses).
Objective: sum over micro-batches of (fixed + makespan). Moves, tried on the
slowest group of each micro-batch:
- relocate one of its sequences to any group (any micro-batch) or to a new
  group on free ranks;
- swap it with a shorter sequence elsewhere;
- grow the group onto free ranks of its micro-batch (a larger allowed degree);
- empty the shortest micro-batch into the others when that saves time.
"""

from __future__ import annotations

import time

from .pack import INF, GroupLoad, MicroBatchLoad
from .table import CostTable

EPS = 1e-9


def _span(mb: MicroBatchLoad) -> float:
    return max((g.load for g in mb.groups if g.seqs), default=0.0)


def _span_without(mb: MicroBatchLoad, g: GroupLoad, new_load: float) -> float:
    """Makespan of `mb` if group `g` had `new_load` (0 when it becomes empty)."""
    m = new_load
    for h in mb.groups:
        if h is not g and h.seqs and h.load > m:
            m = h.load
    return m


class LocalSearch:
    def __init__(self, table: CostTable, num_ranks: int, deadline: float) -> None:
        self.t = table
        self.N = num_ranks
        self.deadline = deadline
        self.degrees = [d for d in table.degrees if d <= num_ranks]
        self.max_eliminate = 16  # emptying a micro-batch copies the plan: only for few micro-batches

    def _out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def _load_of(self, seqs: list[int], d: int) -> float:
        return self.t.overhead[d] + sum(self.t.time[i][d] for i in seqs) if seqs else 0.0

    def cost(self, mbs: list[MicroBatchLoad]) -> float:
        return sum(self.t.fixed + _span(mb) for mb in mbs if any(g.seqs for g in mb.groups))

    # ---- moves ---------------------------------------------------------------
    def _remove(self, mb: MicroBatchLoad, g: GroupLoad, i: int) -> None:
        g.seqs.remove(i)
        g.tokens -= self.t.lengths[i]
        if g.seqs:
            g.load -= self.t.time[i][g.d]
        else:
            mb.groups.remove(g)
            mb.free += g.d

    def _add(self, g: GroupLoad, i: int) -> None:
        if not g.seqs:
            g.load = self.t.overhead[g.d]
        g.seqs.append(i)
        g.tokens += self.t.lengths[i]
        g.load += self.t.time[i][g.d]

    def _best_relocation(self, mbs, m_src, g_src, i, span_src):
        """(delta, kind, payload) of the best place for sequence i outside g_src."""
        t = self.t
        s = t.lengths[i]
        row = t.time[i]
        left = g_src.load - row[g_src.d] if len(g_src.seqs) > 1 else 0.0
        src_new = _span_without(mbs[m_src], g_src, left)
        best = (0.0, None, None)
        for m, mb in enumerate(mbs):
            span = span_src if m == m_src else _span(mb)
            for h in mb.groups:
                if h is g_src or row[h.d] == INF or h.tokens + s > t.cap[h.d]:
                    continue
                new = h.load + row[h.d]
                if m == m_src:
                    delta = max(src_new, new) - span_src
                else:
                    delta = (src_new - span_src) + max(0.0, new - span)
                if delta < best[0] - EPS:
                    best = (delta, "group", (m, h))
            if mb.free > 0:
                for d in self.degrees:
                    if d > mb.free or row[d] == INF:
                        continue
                    new = t.overhead[d] + row[d]
                    if m == m_src:
                        delta = max(src_new, new) - span_src
                    else:
                        delta = (src_new - span_src) + max(0.0, new - span)
                    if delta < best[0] - EPS:
                        best = (delta, "new", (m, d))
        return best

    def _best_swap(self, mbs, m_src, g_src, i, span_src):
        t = self.t
        si, ri = t.lengths[i], t.time[i]
        best = (0.0, None)
        spans = [_span(mb) for mb in mbs]
        for m, mb in enumerate(mbs):
            for h in mb.groups:
                if h is g_src or ri[h.d] == INF:
                    continue
                for j in h.seqs:
                    sj, rj = t.lengths[j], t.time[j]
                    if rj[g_src.d] >= ri[g_src.d] or rj[g_src.d] == INF:
                        continue
                    if g_src.tokens - si + sj > t.cap[g_src.d] or h.tokens - sj + si > t.cap[h.d]:
                        continue
                    g_new = g_src.load - ri[g_src.d] + rj[g_src.d]
                    h_new = h.load - rj[h.d] + ri[h.d]
                    if m == m_src:
                        rest = max((x.load for x in mb.groups if x is not g_src and x is not h and x.seqs), default=0.0)
                        delta = max(rest, g_new, h_new) - span_src
                    else:
                        delta = (_span_without(mbs[m_src], g_src, g_new) - span_src) + max(0.0, h_new - spans[m])
                    if delta < best[0] - EPS:
                        best = (delta, (m, h, j))
        return best

    def _try_grow(self, mb: MicroBatchLoad, g: GroupLoad, span: float) -> bool:
        best = None
        for d in self.degrees:
            if d <= g.d or d - g.d > mb.free or g.tokens > self.t.cap[d]:
                continue
            new = self._load_of(g.seqs, d)
            if new == INF:
                continue
            if _span_without(mb, g, new) < span - EPS and (best is None or new < best[0]):
                best = (new, d)
        if best is None:
            return False
        mb.free -= best[1] - g.d
        g.d, g.load = best[1], best[0]
        return True

    def _try_eliminate(self, mbs: list[MicroBatchLoad]) -> bool:
        """Empty the shortest micro-batch into the others if the total drops."""
        if len(mbs) < 2 or len(mbs) > self.max_eliminate or sum(len(mb.groups) for mb in mbs) > 4000:
            return False
        import copy

        k = min(range(len(mbs)), key=lambda m: _span(mbs[m]))
        trial = copy.deepcopy(mbs)
        victim = trial.pop(k)
        before = self.cost(mbs)
        seqs = sorted((i for g in victim.groups for i in g.seqs), key=lambda i: -self.t.lengths[i])
        for i in seqs:
            row, s = self.t.time[i], self.t.lengths[i]
            best = None
            for m, mb in enumerate(trial):
                span = _span(mb)
                for h in mb.groups:
                    if row[h.d] == INF or h.tokens + s > self.t.cap[h.d]:
                        continue
                    inc = max(0.0, h.load + row[h.d] - span)
                    if best is None or inc < best[0]:
                        best = (inc, "group", m, h)
                for d in self.degrees:
                    if d <= mb.free and row[d] != INF:
                        inc = max(0.0, self.t.overhead[d] + row[d] - span)
                        if best is None or inc < best[0]:
                            best = (inc, "new", m, d)
            if best is None:
                return False
            _, kind, m, x = best
            if kind == "group":
                self._add(x, i)
            else:
                g = GroupLoad(x, 0.0, 0, [])
                self._add(g, i)
                trial[m].groups.append(g)
                trial[m].free -= x
        if self.cost(trial) < before - EPS:
            mbs[:] = trial
            return True
        return False

    # ---- driver ----------------------------------------------------------------
    def improve(self, mbs: list[MicroBatchLoad], use_swaps: bool = True) -> list[MicroBatchLoad]:
        """Improve `mbs` in place until no move helps or the deadline passes; return it."""
        while not self._out_of_time() and self._try_eliminate(mbs):
            pass
        while not self._out_of_time():
            moved = False
            order = sorted(range(len(mbs)), key=lambda m: -_span(mbs[m]))
            for m in order:
                mb = mbs[m]
                if not mb.groups:
                    continue
                span = _span(mb)
                g = max((x for x in mb.groups if x.seqs), key=lambda x: x.load)
                if mb.free and self._try_grow(mb, g, span):
                    moved = True
                    break
                for i in sorted(g.seqs, key=lambda i: -self.t.time[i][g.d]):
                    delta, kind, payload = self._best_relocation(mbs, m, g, i, span)
                    if kind is not None:
                        self._remove(mb, g, i)
                        m2, x = payload
                        if kind == "group":
                            self._add(x, i)
                        else:
                            ng = GroupLoad(x, 0.0, 0, [])
                            self._add(ng, i)
                            mbs[m2].groups.append(ng)
                            mbs[m2].free -= x
                        moved = True
                        break
                    if use_swaps:
                        delta, payload = self._best_swap(mbs, m, g, i, span)
                        if payload is not None:
                            m2, h, j = payload
                            self._remove(mb, g, i)
                            self._remove(mbs[m2], h, j)
                            # groups emptied by the removal were dropped: re-attach if needed
                            for grp, mbx in ((g, mb), (h, mbs[m2])):
                                if not grp.seqs and grp not in mbx.groups:
                                    mbx.groups.append(grp)
                                    mbx.free -= grp.d
                            self._add(g, j)
                            self._add(h, i)
                            moved = True
                            break
                    if self._out_of_time():
                        break
                if moved or self._out_of_time():
                    break
            if not moved:
                if not self._out_of_time() and self._try_eliminate(mbs):
                    continue
                break
        mbs[:] = [mb for mb in mbs if any(g.seqs for g in mb.groups)]
        return mbs
