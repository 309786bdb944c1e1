"""Per-step metrics of a training run: JSONL files in the run folder, a progress display, a summary.

Files written by rank 0 (every other rank's logger does nothing)::

    RUN/metrics.jsonl   one line per step  {"kind": "train", "step", "time", "loss", "lr", "tokens",
                                            "step_time_s", "plan_time_s", "num_micro_batches",
                                            "group_sizes": {size: count}, "tokens_per_s",
                                            "tokens_per_s_per_rank", optional "mfu", "val_loss",
                                            "grad_norm", "peak_mem_bytes", "comm_s", "data_s", ...}
                        and one per evaluation {"kind": "eval", "step", "time", "val_loss"}
    RUN/plans.jsonl     one line per step  {"step": int, "plan": Plan.to_dict()}
    RUN/summary.json    written by close(): `hetsp.metrics.summary.summarize` of metrics.jsonl

Opening a run folder that already has these files (a resumed run) keeps the
records of steps before `start_step` and drops the rest, so replayed steps
are not recorded twice.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

from hetsp.metrics.jsonl import dumps, truncate_from_step
from hetsp.metrics.summary import format_table, summarize

log = logging.getLogger("hetsp.metrics")

Progress = Literal["auto", "bar", "lines", "off"]


def format_group_sizes(group_sizes: dict[Any, int]) -> str:
    """{1: 6, 2: 1} -> "1x6 2x1" (group size x number of groups)."""
    items = sorted((int(size), int(count)) for size, count in group_sizes.items())
    return " ".join(f"{size}x{count}" for size, count in items) or "-"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _default_world_size() -> int:
    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class MetricsLogger:
    """Rank-0 metrics of a run (see the module docstring for the files).

    world_size: ranks in the job (for tokens/s per rank and MFU); None: the initialised
    torch.distributed world's size, or 1 without one.
    peak_flops_per_rank: `hetsp.metrics.flops.peak_flops` of the device, or None (MFU then not reported).
    progress: "bar" (tqdm), "lines" (one plain line every `print_every` steps, for
    output that is piped, e.g. through the launcher), "off", or "auto" (bar on a terminal, lines otherwise).
    """

    def __init__(
        self,
        run_dir: Path,
        is_rank0: bool,
        total_steps: int,
        start_step: int = 0,
        *,
        world_size: int | None = None,
        peak_flops_per_rank: float | None = None,
        progress: Progress = "auto",
        print_every: int = 1,
        report_to: tuple[str, ...] | list[str] = ("jsonl",),
    ):
        self.run_dir = Path(run_dir)
        self.is_rank0 = is_rank0
        self.total_steps = total_steps
        self.start_step = start_step
        self.world_size = world_size if world_size is not None else _default_world_size()
        self.peak_flops_per_rank = peak_flops_per_rank
        self.print_every = max(1, print_every)
        self.records: list[dict[str, Any]] = []
        self._bar = None
        self._metrics = self._plans = None
        self._closed = False
        self._done = start_step  # steps completed, for the progress display
        if not is_rank0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.records = truncate_from_step(self.metrics_path, start_step)
        truncate_from_step(self.plans_path, start_step)
        self._metrics = self.metrics_path.open("a")
        self._plans = self.plans_path.open("a")
        self._tensorboard = None
        if "tensorboard" in report_to:  # run.report_to; metrics.jsonl is always written
            from hetsp.metrics.tensorboard import TensorBoardWriter

            self._tensorboard = TensorBoardWriter(self.run_dir)
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "lines"
        self.progress = progress
        if progress == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if peak_flops_per_rank is None:
            log.info("device peak FLOPs unknown: MFU is not reported")

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def plans_path(self) -> Path:
        return self.run_dir / "plans.jsonl"

    # ------------------------------------------------------------------ logging
    def log_step(self, step: int, record: dict[str, Any]) -> dict[str, Any] | None:
        """Record one training step; return the line written (with derived rates), None off rank 0.

        Derived when absent: tokens_per_s (tokens / step_time_s), tokens_per_s_per_rank,
        and mfu when the record carries "model_flops" (the step's model FLOPs,
        `hetsp.metrics.flops.ModelFlops.for_lengths(plan.lengths)`) and the device peak is known.
        """
        if not self.is_rank0:
            return None
        out: dict[str, Any] = {"kind": "train", "step": int(step), "time": time.time()}
        out.update(record)
        out["step"] = int(step)
        seconds = out.get("step_time_s") or 0.0
        if out.get("tokens_per_s") is None and seconds > 0:
            out["tokens_per_s"] = out.get("tokens", 0) / seconds
        if out.get("tokens_per_s") is not None:
            out.setdefault("tokens_per_s_per_rank", out["tokens_per_s"] / self.world_size)
        if out.get("mfu") is None and out.get("model_flops") and self.peak_flops_per_rank and seconds > 0:
            from hetsp.metrics.flops import mfu

            out["mfu"] = mfu(out["model_flops"], seconds, self.world_size, self.peak_flops_per_rank)
        if "group_sizes" in out:
            out["group_sizes"] = {str(k): int(v) for k, v in out["group_sizes"].items()}
        self._write(self._metrics, out)
        self.records.append(out)
        self._done += 1
        self._show(out)
        return out

    def log_plan(self, step: int, plan: Any) -> None:
        """Append the step's `hetsp.plan.Plan` (its to_dict form) to plans.jsonl."""
        if self.is_rank0:
            self._write(self._plans, {"step": int(step), "plan": plan.to_dict()})

    def log_eval(self, step: int, val_loss: float) -> None:
        if not self.is_rank0:
            return
        out = {"kind": "eval", "step": int(step), "time": time.time(), "val_loss": float(val_loss)}
        self._write(self._metrics, out)
        self.records.append(out)
        message = f"step {step}: val loss {val_loss:.4f}"
        if self._bar is not None:
            self._bar.write(message)
        elif self.progress == "lines":
            print(message, flush=True)

    def log_heldout(self, updates: int, values: dict[str, float]) -> None:
        """A held-out evaluation after `updates` optimizer steps (0: the starting policy)."""
        if not self.is_rank0:
            return
        out = {"kind": "heldout", "step": int(updates), "time": time.time(), **values}
        self._write(self._metrics, out)
        self.records.append(out)
        message = f"after {updates} step(s): held-out " + ", ".join(f"{k.removeprefix('heldout_')} {v:.4f}" for k, v in values.items())
        if self._bar is not None:
            self._bar.write(message)
        elif self.progress == "lines":
            print(message, flush=True)

    def _write(self, handle: Any, record: dict[str, Any]) -> None:
        handle.write(dumps(record))
        handle.flush()
        if handle is self._metrics and getattr(self, "_tensorboard", None) is not None:
            self._tensorboard.add(record)

    def _show(self, out: dict[str, Any]) -> None:
        parts = [f"loss {out['loss']:.4f}" if out.get("loss") is not None else "loss n/a"]
        if out.get("tokens_per_s") is not None:
            parts.append(f"{_si(out['tokens_per_s'])} tok/s")
        parts.append(f"groups {format_group_sizes(out.get('group_sizes', {}))}")
        if out.get("plan_time_s") is not None:
            parts.append(f"plan {1000 * out['plan_time_s']:.1f} ms")
        if out.get("mfu") is not None:
            parts.append(f"MFU {100 * out['mfu']:.1f}%")
        if out.get("reward_chosen") is not None:  # sequence-level objectives (CoPG)
            parts.append(f"reward {out['reward_chosen']:.3f}/{out['reward_rejected']:.3f}")
            parts.append(f"margin {out['margin']:.3f} | KL {out['kl']:.3f}")
            if out.get("order_acc") is not None:
                parts.append(f"order {100 * out['order_acc']:.0f}%")
        if out.get("sm_weight") is not None:  # SequenceMatch: its weight, injected noise, sampled trajectories
            parts.append(f"SM {out['sm_weight']:g} | noise {100 * out['noise_frac']:.1f}% | V {out['sm_value_data']:.3f}"
                         + (f" | sampled {out['model_trajectories']:.0f}" if out.get("model_trajectories") else ""))
        if self._bar is not None:
            self._bar.set_postfix_str(" | ".join(parts), refresh=False)
            self._bar.update(1)
        elif self.progress == "lines":
            if self._done % self.print_every == 0 or self._done >= self.total_steps:
                print(f"step {out['step']} ({self._done}/{self.total_steps}) | " + " | ".join(parts), flush=True)

    # ------------------------------------------------------------------ end
    def summary(self) -> dict[str, Any]:
        return summarize(self.records, self.world_size)

    def close(self) -> dict[str, Any] | None:
        """Print the summary table, write summary.json, close the files; return the summary (rank 0)."""
        if not self.is_rank0 or self._closed:
            return None
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        for handle in (self._metrics, self._plans):
            handle.close()
        if getattr(self, "_tensorboard", None) is not None:
            self._tensorboard.close()
        summary = self.summary()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_table(summary), flush=True)
        return summary

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
