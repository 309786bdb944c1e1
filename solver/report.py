"""Text tables for the inspection tool."""

from __future__ import annotations

from typing import Sequence

from .compare import BatchReport
from .simulate import simulate


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plan_table(rep: BatchReport, cm, num_ranks: int) -> str:
    """One block per micro-batch: its groups with ranks, size, sequences, tokens, time and memory."""
    plan = rep.plan
    sim = simulate(plan, cm, num_ranks)
    bundle_of = {s: k for k, b in enumerate(plan.bundles) for s in b}
    out = []
    for m, (mb, cost) in enumerate(zip(plan.micro_batches, sim.micro_batches)):
        rows = []
        for g in mb.groups:
            ls = [plan.lengths[s] for s in g.seqs]
            mem = cm.memory_per_rank_gb(ls, g.size)
            rows.append(
                [
                    f"{g.start}-{g.stop - 1}",
                    g.size,
                    len(ls),
                    sum(ls),
                    max(ls, default=0),
                    f"{cm.group_time(ls, g.size):.3f}",
                    f"{100 * sum(ls) / cm.capacity(g.size):.0f}%",
                    "-" if mem is None else f"{mem:.1f}",
                ]
                + ([_bundle_list(g.seqs, bundle_of)] if plan.bundles else [])
            )
        out.append(f"micro-batch {m}: {cost.time_s:.3f} s (fixed {cost.fixed_s:.3f} s, {len(mb.groups)} groups)")
        header = ["ranks", "size", "seqs", "tokens", "longest", "time_s", "memory", "GB/rank"]
        out.append(_table(header + (["bundles"] if plan.bundles else []), rows))
    return "\n".join(out)


def _bundle_list(seqs: Sequence[int], bundle_of: dict[int, int], limit: int = 8) -> str:
    """The bundles a group holds sequences of (b<k>), a few then a count."""
    ks = sorted({bundle_of[s] for s in seqs if s in bundle_of})
    text = ",".join(f"b{k}" for k in ks[:limit])
    return text + (f",+{len(ks) - limit}" if len(ks) > limit else "") if ks else "-"


def comparison_table(rep: BatchReport) -> str:
    rows = []
    for name, r in rep.rows.items():
        extra = f" d={r['group_size']}" if "group_size" in r else ""
        rows.append(
            [name + extra, f"{r['est_s']:.3f}", f"{100 * r['gap']:+.1f}%", r["micro_batches"], f"{r['solve_s']:.3f}", r["status"]]
        )
    rows.append(["lower bound", f"{rep.bound['total_s']:.3f}", "", rep.bound["min_micro_batches"], "", ""])
    if rep.bound.get("tight_s", 0) > rep.bound["total_s"]:
        rows.append(["tighter bound", f"{rep.bound['tight_s']:.3f}", "", "", "", ""])
    return _table(["planner", "est_s", "vs bound", "micro-batches", "solve_s", "status"], rows)


def summary_table(reports: Sequence[BatchReport]) -> str:
    names = list(reports[0].rows)
    rows = []
    for rep in reports:
        rows.append([rep.index, len(rep.lengths)] + [f"{rep.rows[n]['est_s']:.3f}" for n in names] + [f"{rep.bound['total_s']:.3f}"])
    totals = [sum(rep.rows[n]["est_s"] for rep in reports) for n in names]
    lb = sum(rep.bound["total_s"] for rep in reports)
    rows.append(["total", sum(len(r.lengths) for r in reports)] + [f"{t:.3f}" for t in totals] + [f"{lb:.3f}"])
    return _table(["batch", "seqs"] + names + ["bound"], rows)
