"""End-of-run summary of metrics.jsonl records: a dict (summary.json) and a text table."""

from __future__ import annotations

from typing import Any, Iterable

from hetsp.metrics.prediction import prediction_errors


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: Iterable[dict[str, Any]], world_size: int) -> dict[str, Any]:
    """Totals and means over the "train" and "eval" records of a run.

    tokens_per_s is total tokens over total step time (a time-weighted mean);
    plan_time_share is the summed planning time over the summed step time;
    est_*_rel_error: the planner's predicted step time against the measured one
    (`hetsp.metrics.prediction`).
    """
    records = list(records)
    train = [r for r in records if r.get("kind", "train") == "train"]
    losses = [r["loss"] for r in train if r.get("loss") is not None]
    val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    tokens = sum(r.get("tokens", 0) or 0 for r in train)
    step_time = sum(r.get("step_time_s", 0.0) or 0.0 for r in train)
    plan_time = sum(r.get("plan_time_s", 0.0) or 0.0 for r in train)
    comm_times = [r["comm_s"] for r in train if r.get("comm_s") is not None]
    data_times = [r["data_s"] for r in train if r.get("data_s") is not None]
    mems = [r["peak_mem_bytes"] for r in train if r.get("peak_mem_bytes") is not None]
    mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
    tokens_per_s = tokens / step_time if step_time > 0 else None
    errors = prediction_errors(train) or {}
    heldout = [r for r in records if r.get("kind") == "heldout"]
    first = next((r for r in heldout if r.get("step") == 0), None)  # before any update
    return {
        "steps": len(train),
        "last_step": max((r["step"] for r in train), default=None),
        "tokens": tokens,
        "mean_loss": _mean(losses),
        "last_loss": losses[-1] if losses else None,
        "best_val_loss": min(val) if val else None,
        "last_val_loss": val[-1] if val else None,
        "train_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_rank": tokens_per_s / world_size if tokens_per_s is not None else None,
        "world_size": world_size,
        "plan_time_share": plan_time / step_time if step_time > 0 else None,
        "comm_time_share": sum(comm_times) / step_time if comm_times and step_time > 0 else None,
        "data_time_share": sum(data_times) / step_time if data_times and step_time > 0 else None,
        "mean_mfu": _mean(mfus),
        "peak_mem_bytes": max(mems) if mems else None,
        "est_median_rel_error": errors.get("median_rel_error"),
        "est_worst_rel_error": errors.get("worst_rel_error"),
        # held-out evaluations of a sequence-level objective (CoPG's `objective.eval_prompts`)
        "heldout_reward_before": first.get("heldout_reward") if first else None,
        "heldout_reward_after": heldout[-1].get("heldout_reward") if heldout and heldout[-1] is not first else None,
        "heldout_kl_after": heldout[-1].get("heldout_kl") if heldout and heldout[-1] is not first else None,
    }


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "int":
        return f"{value:,}"
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "s":
        return f"{value:.1f} s"
    if kind == "bytes":
        return f"{value / 2**30:.2f} GiB"
    return str(value)


ROWS = (
    ("steps", "steps", "int"),
    ("tokens", "tokens", "int"),
    ("mean_loss", "mean train loss", "loss"),
    ("last_loss", "last train loss", "loss"),
    ("best_val_loss", "best val loss", "loss"),
    ("train_time_s", "time in steps", "s"),
    ("tokens_per_s", "tokens/s (total)", "rate"),
    ("tokens_per_s_per_rank", "tokens/s (per rank)", "rate"),
    ("plan_time_share", "planning time share", "pct"),
    ("comm_time_share", "communication time share", "pct"),
    ("data_time_share", "data loading time share", "pct"),
    ("mean_mfu", "MFU (mean)", "pct"),
    ("peak_mem_bytes", "peak memory (rank 0)", "bytes"),
    ("est_median_rel_error", "step time predicted: median error", "pct"),
    ("est_worst_rel_error", "step time predicted: worst error", "pct"),
    ("heldout_reward_before", "held-out reward before", "loss"),
    ("heldout_reward_after", "held-out reward after", "loss"),
    ("heldout_kl_after", "held-out KL to reference after", "loss"),
)

OPTIONAL_ROWS = {"comm_time_share", "data_time_share", "mean_mfu", "est_median_rel_error", "est_worst_rel_error",
                 "heldout_reward_before", "heldout_reward_after", "heldout_kl_after"}


def format_table(summary: dict[str, Any]) -> str:
    """A two-column text table of `summarize`'s result."""
    # Rows of figures that were never measured are left out (MFU: not shown as a guess
    # when the device peak is unknown).
    cells = [
        (label, _fmt(summary.get(key), kind))
        for key, label, kind in ROWS
        if not (key in OPTIONAL_ROWS and summary.get(key) is None)
    ]
    width = max(len(label) for label, _ in cells)
    value_width = max(len(v) for _, v in cells)
    rule = "-" * (width + value_width + 3)
    lines = [rule] + [f"{label:<{width}} | {v:>{value_width}}" for label, v in cells] + [rule]
    return "\n".join(lines)
