"""Figures of what the planner decided and how well it predicted, for `hetsp-plot`.

- ``lengths.png``: histogram of the sequence lengths of the run's batches (log-spaced bins),
  each bar split by the size of the group the planner put those sequences on, and next to
  it the share of tokens each group size trained (from plans.jsonl);
- ``predicted.png``: the planner's predicted step time (``est_time_s``) against the
  measured one (``step_time_s``), per step, with the median and worst relative error.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from hetsp.metrics.jsonl import read_jsonl
from hetsp.metrics.prediction import prediction_errors, prediction_pairs


def sequences_by_group_size(plans: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Lengths of the sequences the plans placed on groups of each size: ``{size: [length, ...]}``."""
    out: dict[int, list[int]] = defaultdict(list)
    for rec in plans:
        plan = rec["plan"]
        lengths = plan["lengths"]
        for mb in plan["micro_batches"]:
            for g in mb:
                out[int(g["size"])].extend(int(lengths[s]) for s in g.get("seqs", ()))
    return dict(sorted(out.items()))


def plot_lengths(run_dir: Path, out_dir: Path, plt: Any) -> Path | None:
    """``lengths.png`` (None when the run folder has no plans.jsonl)."""
    path = Path(run_dir) / "plans.jsonl"
    if not path.is_file():
        return None
    by_size = sequences_by_group_size(read_jsonl(path))
    every = [n for v in by_size.values() for n in v]
    if not every:
        return None
    lo, hi = max(1, min(every)), max(every)
    num_bins = 24
    edges = [lo * (hi / lo) ** (k / num_bins) for k in range(num_bins + 1)] if hi > lo else [lo - 0.5, lo + 0.5]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    sizes = list(by_size)
    ax.hist([by_size[d] for d in sizes], bins=edges, stacked=True, label=[f"group of {d}" for d in sizes])
    if hi > lo:
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="sequence length (tokens)", ylabel="sequences",
           title=f"{Path(run_dir).resolve().name}: lengths of {len(every):,} sequences by the group size they ran on")
    ax.legend()
    ax.grid(alpha=0.3)
    tokens = Counter({d: sum(v) for d, v in by_size.items()})
    total = sum(tokens.values())
    ax2.bar([str(d) for d in sizes], [100 * tokens[d] / total for d in sizes])
    ax2.set(xlabel="group size", ylabel="% of tokens", title="tokens by group size")
    ax2.grid(alpha=0.3, axis="y")
    out = Path(out_dir) / "lengths.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_predicted(records: list[dict[str, Any]], run_name: str, out_dir: Path, plt: Any) -> Path | None:
    """``predicted.png`` (None when no step records a predicted time)."""
    pairs = prediction_pairs(records)
    if not pairs:
        return None
    errors = prediction_errors(records)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [s for s, _, _ in pairs]
    ax.plot(steps, [m for _, _, m in pairs], label="measured", linewidth=1)
    ax.plot(steps, [p for _, p, _ in pairs], label="predicted by the planner", linewidth=1)
    ax.set(xlabel="step", ylabel="step time (s)", title=f"{run_name}: step time")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    ax2.scatter([m for _, _, m in pairs[1:] or pairs], [p for _, p, _ in pairs[1:] or pairs], s=10)
    top = max(max(p, m) for _, p, m in pairs) * 1.05
    ax2.plot([0, top], [0, top], color="0.5", linewidth=1, label="predicted = measured")
    ax2.set(xlim=(0, top), ylim=(0, top), xlabel="measured (s)", ylabel="predicted (s)",
            title=(f"relative error: median {100 * errors['median_rel_error']:.0f}%, "
                   f"worst {100 * errors['worst_rel_error']:.0f}%"))
    ax2.grid(alpha=0.3)
    ax2.legend()
    out = Path(out_dir) / "predicted.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
