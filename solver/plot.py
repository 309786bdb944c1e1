"""Draw a plan: ranks on the vertical axis, time on the horizontal, one box per group."""

from __future__ import annotations

from hetsp.plan import Plan

from .simulate import simulate


def plot_plan(plan: Plan, cm, num_ranks: int, path: str, title: str = "") -> None:
    """Write a PNG of `plan` under cost model `cm` to `path` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    sim = simulate(plan, cm, num_ranks)
    fig, ax = plt.subplots(figsize=(10, max(3, min(12, num_ranks / 8))))
    t = 0.0
    colors = plt.get_cmap("tab20")
    for m, (mb, cost) in enumerate(zip(plan.micro_batches, sim.micro_batches)):
        if cost.fixed_s > 0:
            ax.add_patch(Rectangle((t, 0), cost.fixed_s, num_ranks, color="0.85", hatch="//", lw=0))
        t0 = t + cost.fixed_s
        for k, g in enumerate(mb.groups):
            ls = [plan.lengths[s] for s in g.seqs]
            if not ls:
                continue
            dur = cm.group_time(ls, g.size)
            ax.add_patch(Rectangle((t0, g.start), dur, g.size, facecolor=colors(k % 20), edgecolor="k", lw=0.5))
            if g.size >= max(1, num_ranks // 32):
                ax.text(t0 + dur / 2, g.start + g.size / 2, f"{len(ls)}", ha="center", va="center", fontsize=6)
        t += cost.time_s
        ax.axvline(t, color="k", lw=1)
    ax.set_xlim(0, max(t, 1e-9))
    ax.set_ylim(num_ranks, 0)
    ax.set_xlabel("time (s, estimated)")
    ax.set_ylabel("rank")
    ax.set_title(title or f"{plan.meta.get('planner', 'plan')}: {t:.3f} s, {plan.num_micro_batches} micro-batches")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
