"""Planner benchmark: FlexSP's own setting reproduced exactly, then scaling from 8 to 1024 ranks.

    python bench/solver.py [--lengths ../shared/data/lengths/wikipedia.txt] [--time-limit 1.0] [--quick]

Prints tables, and as its last line one JSON object with, per model,
total_s, static_s, flexsp_total_s (published), max_solve_s, optimal (micro-batches
proven optimal), lower_bound_s and gap. Timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import solver  # noqa: E402
from hetsp.config import ClusterConfig, PlannerConfig  # noqa: E402
from solver.baselines import static_packing  # noqa: E402
from solver.bounds import lower_bound  # noqa: E402
from solver.compare import best_static_total  # noqa: E402
from solver.costs.flexsp import FlexSPCostModel  # noqa: E402
from solver.degrees import candidate_degrees  # noqa: E402
from solver.flexsp_setting import (  # noqa: E402
    DEGREES, MEMORY_GB, NUM_RANKS, PUBLISHED, STATIC_FILL, flexsp_batches,
)
from solver.inputs import read_lengths_file  # noqa: E402
from solver.pack import plan_cost  # noqa: E402
from solver.simulate import simulate  # noqa: E402
from solver.table import CostTable  # noqa: E402

DEFAULT_LENGTHS = ROOT.parent / "shared" / "data" / "lengths" / "wikipedia.txt"
OUTPUT: list[str] = []


def say(*parts, file=None) -> None:
    """Print and keep the text for --markdown."""
    text = " ".join(str(p) for p in parts)
    print(text, file=file or sys.stdout)
    if file is None:
        OUTPUT.append(text)


def table(header, rows) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(x).rjust(k) for x, k in zip(r, w))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * k for k in w])] + [fmt(r) for r in rows])


def flexsp_reproduction(path: Path, time_limit: float) -> dict:
    batches = flexsp_batches(path)
    out = {}
    for model in ("7b", "13b", "30b"):
        cm = FlexSPCostModel(model, NUM_RANKS, MEMORY_GB)
        cluster = ClusterConfig(memory_per_rank_gb=MEMORY_GB, ranks_per_node=8)
        rows = []
        tot = {"milp": 0.0, "greedy": 0.0, "batch_adaptive": 0.0, "static": 0.0, "bound": 0.0, "tight": 0.0}
        max_solve = {"milp": 0.0, "greedy": 0.0}
        optimal = 0
        num_mbs = 0
        planners = {}
        for name in ("milp", "greedy", "batch_adaptive"):
            cfg = PlannerConfig(
                cost_model="flexsp", flexsp_model=model, allowed_group_sizes=DEGREES, time_limit_s=time_limit,
                options={"fill": STATIC_FILL} if name == "batch_adaptive" else {},
            )
            planners[name] = solver.get_planner(name, cfg, cluster)
        for k, b in enumerate(batches):
            t = CostTable(b, DEGREES, cm)
            static = plan_cost(static_packing(t, NUM_RANKS, 64, STATIC_FILL), cm.fixed_s)
            bound = lower_bound(b, cm, DEGREES, NUM_RANKS)
            lb = bound.total_s
            row = {"static": static, "bound": lb, "tight": bound.tight_s}
            for name, p in planners.items():
                plan = p.plan(b, NUM_RANKS)
                row[name] = simulate(plan, cm, NUM_RANKS).total_s
                if name in max_solve:
                    max_solve[name] = max(max_solve[name], plan.meta["solve_s"])
                if name == "milp":
                    optimal += plan.meta.get("optimal_micro_batches", 0)
                    num_mbs += plan.num_micro_batches
                    row["status"] = plan.meta["status"]
                    row["mbs"] = plan.num_micro_batches
                    row["solve"] = plan.meta["solve_s"]
            for key in tot:
                tot[key] += row[key]
            rows.append([k, len(b), sum(b), f"{row['static']:.3f}", f"{row['batch_adaptive']:.3f}", f"{row['greedy']:.3f}",
                         f"{row['milp']:.3f}", f"{row['bound']:.3f}", f"{100 * (row['milp'] / lb - 1):.1f}%", row["mbs"],
                         f"{row['solve']:.2f}", row["status"]])
        best = best_static_total(batches, NUM_RANKS, cm, DEGREES, STATIC_FILL)
        pub = PUBLISHED[model]
        rows.append(["total", "", "", f"{tot['static']:.3f}", f"{tot['batch_adaptive']:.3f}", f"{tot['greedy']:.3f}",
                     f"{tot['milp']:.3f}", f"{tot['bound']:.3f}", f"{100 * (tot['milp'] / tot['bound'] - 1):.1f}%", "",
                     f"{max_solve['milp']:.2f}", ""])
        say(f"\n=== FlexSP setting, GPT-{model.upper()}: 64 ranks, 30 GB, sizes {DEGREES}, first 5 batches of 512")
        say(table(["batch", "seqs", "tokens", "static64", "batch_adapt", "greedy", "milp", "bound", "gap", "mbs",
                     "solve_s", "status"], rows))
        say(f"published FlexSP {pub['flexsp_total_s']:.2f} s ({100 * (pub['flexsp_total_s'] / tot['bound'] - 1):.1f}% above the bound), "
              f"static-64 {pub['static_s']:.2f} s; best single static size over the 5 batches: "
              f"{best[0] if best else '-'} ({best[1]:.3f} s)" if best else "")
        say(f"speedup over static-64: milp {tot['static'] / tot['milp']:.3f}, FlexSP {pub['static_s'] / pub['flexsp_total_s']:.3f}, "
              f"batch-adaptive {tot['static'] / tot['batch_adaptive']:.3f}; max solve per batch: milp "
              f"{max_solve['milp']:.3f} s, greedy {max_solve['greedy']:.3f} s")
        say(f"tighter bound (longest sequence priced at one size in both terms): {tot['tight']:.3f} s, "
              f"milp {100 * (tot['milp'] / tot['tight'] - 1):.1f}% above it")
        out[model] = {
            "total_s": round(tot["milp"], 4),
            "greedy_s": round(tot["greedy"], 4),
            "batch_adaptive_s": round(tot["batch_adaptive"], 4),
            "static_s": round(tot["static"], 4),
            "flexsp_total_s": pub["flexsp_total_s"],
            "lower_bound_s": round(tot["bound"], 4),
            "gap": round(tot["milp"] / tot["bound"] - 1, 4),
            "tight_lower_bound_s": round(tot["tight"], 4),
            "tight_gap": round(tot["milp"] / tot["tight"] - 1, 4),
            "max_solve_s": round(max_solve["milp"], 3),
            "optimal": optimal,
            "micro_batches": num_mbs,
        }
    return out


def scaling(path: Path, time_limit: float, ranks_list) -> dict:
    lengths = read_lengths_file(path)
    lengths = [(n + 127) // 128 * 128 for n in lengths]
    rows, out = [], {}
    for n in ranks_list:
        batch_size = max(512, 8 * n)
        cm = FlexSPCostModel("7b", n, MEMORY_GB)
        cfg = PlannerConfig(cost_model="flexsp", flexsp_model="7b", time_limit_s=time_limit, long_policy="drop")
        cluster = ClusterConfig(memory_per_rank_gb=MEMORY_GB, ranks_per_node=min(8, n))
        p = solver.get_planner("milp", cfg, cluster)
        degs = candidate_degrees([], n, 40, 8)
        start = 5 * 512  # after the batches of the FlexSP setting
        b = lengths[start : start + batch_size]
        t0 = time.perf_counter()
        plan = p.plan(b, n)
        wall = time.perf_counter() - t0
        kept = list(plan.lengths)
        est = simulate(plan, cm, n).total_s
        lb = lower_bound(kept, cm, degs, n).total_s
        static_d = max(d for d in degs if max(kept) <= cm.capacity(d))
        static = plan_cost(static_packing(CostTable(kept, [static_d], cm), n, static_d, 1.0), cm.fixed_s)
        rows.append([n, len(b), len(plan.dropped), len(degs), f"{static:.2f}", f"{est:.2f}", f"{lb:.2f}",
                     f"{100 * (est / lb - 1):.1f}%", plan.num_micro_batches, f"{wall:.2f}", plan.meta["status"]])
        out[str(n)] = {"est_s": round(est, 4), "lower_bound_s": round(lb, 4), "gap": round(est / lb - 1, 4),
                       "solve_s": round(wall, 3), "seqs": len(b)}
    say("\n=== scaling: GPT-7B FlexSP model, 30 GB/rank, every group size allowed, 8 ranks per node, 8 x ranks sequences")
    say(table(["ranks", "seqs", "dropped", "sizes tried", "static(max d)", "milp", "bound", "gap", "mbs", "solve_s",
                 "status"], rows))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=str(DEFAULT_LENGTHS))
    ap.add_argument("--time-limit", type=float, default=1.0, help="planner time limit per batch (s)")
    ap.add_argument("--ranks", default="8,64,256,1024", help="world sizes for the scaling table")
    ap.add_argument("--markdown", metavar="FILE", help="also write the tables as a Markdown report")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    path = Path(args.lengths)
    if not path.is_file():
        say(f"bench/solver.py: error: lengths file {path} does not exist (pass --lengths)", file=sys.stderr)
        return 2
    say(f"machine: {os.cpu_count()} CPUs; timings are wall-clock and noisy on a shared machine")
    repro = flexsp_reproduction(path, args.time_limit)
    scale = scaling(path, args.time_limit, [int(x) for x in args.ranks.split(",")])
    line = json.dumps({**repro, "scaling": scale})
    if args.markdown:
        write_markdown(Path(args.markdown), repro, line, args)
    print(line)
    return 0


def write_markdown(path: Path, repro: dict, line: str, args) -> None:
    rows = []
    for k in ("7b", "13b", "30b"):
        v = repro[k]
        pub = PUBLISHED[k]
        fgap = pub["flexsp_total_s"] / v["lower_bound_s"] - 1
        rows.append(
            f"| {k.upper()} | {v['total_s']:.2f} s | {v['flexsp_total_s']:.2f} s | {v['static_s']:.2f} s | "
            f"{v['batch_adaptive_s']:.2f} s | {v['lower_bound_s']:.2f} s | {100 * v['gap']:.1f}% | {100 * fgap:.1f}% | "
            f"{v['tight_lower_bound_s']:.2f} s | {100 * v['tight_gap']:.1f}% | {v['max_solve_s']:.2f} s |"
        )
    text = f"""# Planner benchmark

Generated by `python bench/solver.py --time-limit {args.time_limit} --markdown {path}` on {time.strftime('%Y-%m-%d %H:%M %Z')},
{os.cpu_count()} CPUs, shared with other jobs: solve times are noisy wall-clock figures, and the
heuristics are time-budgeted, so totals can move by a few tenths of a percent between runs.

Planner `milp`: the heuristic (makespan-target splits, per-micro-batch repacking, local search),
then the pooled count MILP on micro-batches not yet within 1% of their fluid bound, all within
`planner.time_limit_s` per batch. `gap`: distance to the simple bound of REFERENCE.md section 2;
`tight`: the bound that also prices the longest sequence at one size in both terms. No plan of
these batches is proven optimal (`optimal: 0`): the exact MILP runs only on batches with at most
24 distinct lengths (tests prove optima there); the count MILP proves its pooled model only.

| model | hetsp milp | FlexSP (published) | static-64 | batch-adaptive | bound | hetsp gap | FlexSP gap | tight bound | gap to tight | max solve/batch |
|---|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

FlexSP's own solver needs about 11.5 s per batch on a 2-core machine. The static-64 column and
the bound reproduce FlexSP's published 32.06/52.79/116.09 s and 16.49/28.46/68.66 s.

```
""" + "\n".join(OUTPUT) + f"""
```

Last line of the run:

```
{line}
```
"""
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
