"""`hetsp-plot RUN_DIR [--out DIR]`: PNG plots of a run folder's metrics.jsonl.

Writes ``loss.png`` (train loss per step, validation loss per evaluation),
``throughput.png`` (tokens/s in total and per rank, and MFU when it was
recorded), ``lengths.png`` (the batches' length histogram by the group size the
planner chose), ``predicted.png`` (predicted against measured step time) and, for
runs that record rewards (CoPG), ``alignment.png`` into --out (default: RUN_DIR/plots);
see `hetsp.metrics.plot_plans`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hetsp.metrics.jsonl import read_jsonl


class PlotError(ValueError):
    """A run folder that cannot be plotted; the message says what is missing."""


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"run folder {run_dir} does not exist")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} does not exist: is {run_dir} a hetsp run folder (written by hetsp-launch)?")
    records = read_jsonl(path)
    if not any(r.get("kind", "train") == "train" for r in records):
        raise PlotError(f"{path} holds no training steps yet")
    return records


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get("kind", "train") == kind and r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the PNG files for `run_dir`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = load_records(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(run_dir).resolve().name

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(records, "train", "loss"), label="train", linewidth=1)
    val_steps, val = _series(records, "eval", "val_loss")
    if not val_steps:  # validation loss may also ride on step records
        val_steps, val = _series(records, "train", "val_loss")
    if val_steps:
        ax.plot(val_steps, val, "o-", label="validation", markersize=4)
    ax.set(xlabel="step", ylabel="loss", title=f"{name}: loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    loss_png = out_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    steps, total = _series(records, "train", "tokens_per_s")
    mfu_steps, mfu = _series(records, "train", "mfu")
    fig, axes = plt.subplots(2 if mfu_steps else 1, 1, figsize=(7, 6 if mfu_steps else 4), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, total, label="total", linewidth=1)
    rank_steps, per_rank = _series(records, "train", "tokens_per_s_per_rank")
    if rank_steps:
        ax.plot(rank_steps, per_rank, label="per rank", linewidth=1)
    ax.set(ylabel="tokens/s", title=f"{name}: throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    if mfu_steps:
        axes[1][0].plot(mfu_steps, [100 * m for m in mfu], linewidth=1)
        axes[1][0].set(ylabel="MFU (%)")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set(xlabel="step")
    axes[-1][0].xaxis.set_major_locator(MaxNLocator(integer=True))
    throughput_png = out_dir / "throughput.png"
    fig.tight_layout()
    fig.savefig(throughput_png, dpi=120)
    plt.close(fig)
    from hetsp.metrics.plot_plans import plot_lengths, plot_predicted

    out = [loss_png, throughput_png]
    out += [p for p in (plot_lengths(run_dir, out_dir, plt), plot_predicted(records, name, out_dir, plt)) if p is not None]
    if _series(records, "train", "reward_chosen")[0]:
        out.append(_plot_alignment(records, name, out_dir, plt))
    return out


def _plot_alignment(records: list[dict[str, Any]], name: str, out_dir: Path, plt: Any) -> Path:
    """``alignment.png``: rewards of the best and worst completion per bundle, the log-ratio margin,
    the KL estimate and the ordering accuracy (CoPG runs)."""
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for key, label in (("reward_chosen", "best of bundle"), ("reward_rejected", "worst of bundle")):
        axes[0].plot(*_series(records, "train", key), label=label, linewidth=1)
    axes[0].set(ylabel="reward", title=f"{name}: alignment")
    axes[0].legend()
    for key, label in (("margin", "log-ratio margin"), ("kl", "KL estimate")):
        axes[1].plot(*_series(records, "train", key), label=label, linewidth=1)
    axes[1].legend()
    axes[2].plot(*_series(records, "train", "order_acc"), linewidth=1)
    axes[2].set(ylabel="ordering accuracy", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    path = out_dir / "alignment.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hetsp-plot", description="PNG plots of a run folder: loss, throughput, lengths by group size, predicted step time.")
    parser.add_argument("run_dir", type=Path, help="run folder holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG files (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (PlotError, ValueError) as e:
        print(f"hetsp-plot: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
