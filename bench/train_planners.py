"""Training throughput of one job under different planners, and how well each plan's time was predicted.

Every planner trains the same batches (same seed, same data, same steps), so the
losses must agree to rounding (a plan changes speed, never math); only the time
differs. Runs the launcher once per planner: milp, greedy, batch_adaptive and
static for every group size that can hold the longest sequence of the batches
trained. Per planner: tokens/s and seconds per step (the first step, warm-up,
left out), micro-batches per step, the loss after the last step, the step time the
planner's cost model predicted (median) and the median and worst relative error of
that prediction against the measured step time, and the share of step time ranks
spent blocked in exchanges (comm_s). Prints a Markdown table:

    python bench/train_planners.py --config configs/default.toml --ranks 4 --steps 12 [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402

ADAPTIVE = {
    "milp": ["planner.name='milp'"],
    "greedy": ["planner.name='greedy'"],
    "batch_adaptive": ["planner.name='batch_adaptive'"],
}


def static_sizes(config: str, overrides: list[str], ranks: int, steps: int) -> tuple[list[int], int]:
    """Group sizes whose groups hold the longest sequence of the first `steps` batches, and that length."""
    from hetsp.config import load_config
    from hetsp.data import build_data

    cfg = load_config(config, overrides)
    data = build_data(cfg.data, cfg.run.seed)
    longest = max(max(data.train_batch_lengths(s)) for s in range(steps))
    sizes = cfg.planner.allowed_group_sizes or list(range(1, ranks + 1))
    return [d for d in sizes if d * cfg.cluster.tokens_per_rank >= longest], longest


def run(config: str, ranks: int, steps: int, overrides: list[str], out: Path) -> dict | str:
    """Train `steps` steps with these overrides; the measured figures, or why it failed."""
    sets = [f"train.steps={steps}", "train.eval_every=0", "train.checkpoint_every=0",
            f"run.output_dir='{out}'", "run.name='bench'", *overrides]
    cmd = [sys.executable, "-m", "launcher", "--simulate", str(ranks), config]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode != 0:
        tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or [""]
        return f"failed ({r.returncode}): {tail[0]}"
    from hetsp.metrics.jsonl import read_jsonl
    from hetsp.metrics.prediction import prediction_errors

    records = read_jsonl(out / "bench" / "metrics.jsonl")
    train = [x for x in records if x.get("kind", "train") == "train"]
    timed = train[1:] or train  # the first step pays for warm-up
    secs = sum(x["step_time_s"] for x in timed)
    err = prediction_errors(train) or {}
    comm = [x["comm_s"] for x in timed if x.get("comm_s") is not None]
    return {
        "tok_s": sum(x["tokens"] for x in timed) / secs,
        "step_s": secs / len(timed),
        "mbs": sum(x["num_micro_batches"] for x in train) / len(train),
        "loss": train[-1]["loss"],
        "est_s": err.get("median_predicted_s"),
        "median_err": err.get("median_rel_error"),
        "worst_err": err.get("worst_rel_error"),
        "comm_share": sum(comm) / secs if comm else None,
        "groups": _group_tokens(out / "bench" / "plans.jsonl"),
    }


def _group_tokens(plans: Path) -> str:
    """Share of the tokens trained on each group size, e.g. "1: 20%, 2: 30%, 4: 50%"."""
    from hetsp.metrics.jsonl import read_jsonl
    from hetsp.metrics.plot_plans import sequences_by_group_size

    by = {d: sum(v) for d, v in sequences_by_group_size(read_jsonl(plans)).items()}
    total = sum(by.values()) or 1
    return ", ".join(f"{d}: {100 * t / total:.0f}%" for d, t in sorted(by.items()))


def _load() -> list[str]:
    """The machine's load average over 1, 5 and 15 minutes."""
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def _pct(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--planners", nargs="*", default=None,
                   help="names among milp, greedy, batch_adaptive, 'static d=N' (default: all that apply)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    p.add_argument("--out", default="", help="also write the table to this Markdown file")
    args = p.parse_args()
    sizes, longest = static_sizes(args.config, args.overrides, args.ranks, args.steps)
    planners = dict(ADAPTIVE)
    for d in sizes:
        planners[f"static d={d}"] = ["planner.name='static'", f"planner.group_size={d}"]
    names = args.planners or list(planners)
    load_at_start = _load()
    rows = []
    for name in names:
        if name not in planners:
            p.error(f"unknown planner {name!r}; choose from {list(planners)}")
        print(f"running {name} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            rows.append((name, run(args.config, args.ranks, args.steps, planners[name] + args.overrides, Path(tmp))))
    load = _load()
    lines = [
        f"`{args.config}` on {args.ranks} simulated ranks, {args.steps} steps, the same batches for every planner "
        f"(longest sequence {longest:,} tokens: static sizes {sizes} can hold it); first step left out of the times; "
        f"load average (1 / 5 / 15 min) at the start {' / '.join(load_at_start)}, at the end {' / '.join(load)}.",
        "",
        "| planner | tokens/s | s/step | micro-batches | loss after last step | predicted s/step (median) | "
        "prediction error median / worst | blocked in exchanges | tokens by group size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in rows:
        if isinstance(res, str):
            lines.append(f"| {name} | {res} | | | | | | | |")
            continue
        est = "n/a" if res["est_s"] is None else f"{res['est_s']:.2f}"
        lines.append(f"| {name} | {res['tok_s']:,.0f} | {res['step_s']:.2f} | {res['mbs']:.2f} | {res['loss']:.4f} | "
                     f"{est} | {_pct(res['median_err'], 1)} / {_pct(res['worst_err'], 1)} | {_pct(res['comm_share'])} | "
                     f"{res['groups']} |")
    ok = {n: r for n, r in rows if not isinstance(r, str)}
    statics = {n: r for n, r in ok.items() if n.startswith("static")}
    if "milp" in ok and statics:
        best = max(statics, key=lambda n: statics[n]["tok_s"])
        lines += ["", f"milp / best static ({best}): {ok['milp']['tok_s'] / statics[best]['tok_s']:.2f}x tokens/s"]
    losses = {round(r["loss"], 4) for r in ok.values()}
    if len(losses) > 1:
        lines += ["", f"losses differ between planners: {sorted(losses)}"]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
