"""Training throughput of one job under different planners (prints a table).

Every planner trains the same batches (same seed, same data), so the losses
must agree to rounding (a plan changes speed, never math); only the time
differs. Runs the launcher once per planner:

    python bench/train_planners.py --config configs/default.toml --ranks 4 --steps 12
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLANNERS = {
    "milp": ["planner.name='milp'"],
    "greedy": ["planner.name='greedy'"],
    "static d=1": ["planner.name='static'", "planner.group_size=1"],
    "static d=2": ["planner.name='static'", "planner.group_size=2"],
    "static d=4": ["planner.name='static'", "planner.group_size=4"],
}


def run(config: str, ranks: int, steps: int, overrides: list[str], out: Path) -> dict | None:
    sets = [f"train.steps={steps}", "train.eval_every=0", "train.checkpoint_every=0",
            f"run.output_dir='{out}'", "run.name='bench'", *overrides]
    cmd = [sys.executable, "-m", "launcher", "--simulate", str(ranks), config]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  failed ({r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}", file=sys.stderr)
        return None
    records = [json.loads(x) for x in (out / "bench" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in records if x.get("kind", "train") == "train"]
    timed = train[1:] or train  # the first step pays for warm-up
    secs = sum(x["step_time_s"] for x in timed)
    return {
        "tok_s": sum(x["tokens"] for x in timed) / secs,
        "step_s": secs / len(timed),
        "mbs": sum(x["num_micro_batches"] for x in train) / len(train),
        "loss": train[-1]["loss"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--planners", nargs="*", default=list(PLANNERS), choices=list(PLANNERS))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    args = p.parse_args()
    rows = []
    for name in args.planners:
        print(f"running {name} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            res = run(args.config, args.ranks, args.steps, PLANNERS[name] + args.overrides, Path(tmp))
        rows.append((name, res))
    print(f"\n{args.config} on {args.ranks} simulated ranks, {args.steps} steps (first step excluded from times)")
    print(f"{'planner':<12} {'tokens/s':>9} {'s/step':>7} {'micro-batches':>14} {'last loss':>10}")
    for name, res in rows:
        if res is None:
            print(f"{name:<12} {'failed':>9}")
        else:
            print(f"{name:<12} {res['tok_s']:>9.0f} {res['step_s']:>7.2f} {res['mbs']:>14.2f} {res['loss']:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
