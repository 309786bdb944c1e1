"""Where the cost model's prediction and the measured step diverge, micro-batch by micro-batch:
a rank program started by the launcher.

    python -m launcher --simulate 4 --module bench.cost_model configs/default.toml \\
        --set train.steps=8 [--set k=v ...]

Trains `train.steps` steps of the job as `hetsp-launch` does (its planner, its batches,
its engine) and records, for every micro-batch of every step, on every rank: when it
started and ended (seconds from the start of the step's `run_plan`) and the CPU
seconds its thread spent (`StepResult.micro_batch_s` / `micro_batch_cpu_s`). Rank 0
writes one JSON line per step with the plan, the cost model's time of each group and
micro-batch (`solver.simulate`) to `<run.output_dir>/<run.name>/micro_batches.jsonl`, the predicted step time (`est_time_s`) and the
measured one, and prints per step: predicted and measured step time, and per
micro-batch the predicted time against the measured span (from the end of the
previous micro-batch on its slowest rank to the end of this one on its slowest rank).

With the environment variable ``COST_MODEL_PROFILE=OUT.json`` it first measures the
planner's cost table in the same processes (as ``hetsp-launch --profile OUT.json``
does) and plans with it, so the table and the steps it predicts are measured under
the same load.

Afterwards, any profile against the recorded micro-batches (no ranks):

    python bench/cost_model.py --report RUN/micro_batches.jsonl --profile P.json [--skip 3]

prints the median and worst relative error of the predicted step time (steps before
--skip left out) and, per kind of micro-batch (the sizes of its groups), the median
signed error, for the micro-batch time of the profile (`ProfileCostModel.micro_batch_time`:
cores shared among the busy ranks when the profile records them) and for the slowest
group's table time alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] != str(ROOT):  # before bench/, whose solver.py would hide the solver package
    sys.path.insert(0, str(ROOT))


def report(records: list[dict], profile: str, skip: int) -> str:
    """Predicted against measured, per step and per kind of micro-batch (module docstring), as Markdown."""
    from solver.costs.base import CostModel
    from solver.costs.profile import ProfileCostModel

    cm = ProfileCostModel.load(profile)
    models = {"shared cores": cm.micro_batch_time, "slowest group": lambda gs: CostModel.micro_batch_time(cm, gs)}
    lines = [f"{len(records[skip:])} steps (from step {skip}), profile `{profile}`", "",
             "| micro-batch time | step error median | worst | by kind of micro-batch: count, median signed error |",
             "|---|---|---|---|"]
    for name, time_of in models.items():
        errors, kinds = [], {}
        for rec in records[skip:]:
            total = cm.step_s
            for mb in rec["micro_batches"]:
                groups = [(g["size"], g["lengths"]) for g in mb["groups"]]
                t = time_of(groups)
                total += t
                kind = " + ".join(sorted((str(d) for d, _ in groups), reverse=True))
                kinds.setdefault(kind, []).append((t - mb["span_s"]) / mb["span_s"])
            errors.append(abs(total - rec["step_time_s"]) / rec["step_time_s"])
        by = "; ".join(f"{k}: {len(v)}, {100 * statistics.median(v):+.0f}%" for k, v in sorted(kinds.items()))
        lines.append(f"| {name} | {100 * statistics.median(errors):.0f}% | {100 * max(errors):.0f}% | {by} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--report", default="", help="micro_batches.jsonl of an earlier run (no ranks)")
    p.add_argument("--profile", default="", help="with --report: the profile to predict with")
    p.add_argument("--skip", type=int, default=1, help="with --report: steps left out at the start")
    args, _ = p.parse_known_args(argv)
    if args.report:
        if not args.profile:
            p.error("--report needs --profile")
        records = [json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]
        print(report(records, args.profile, args.skip))
        return 0
    if not args.config:
        p.error("give the job's config (rank program), or --report FILE --profile P.json")

    from hetsp.attention.kernels import kernel_for_config
    from hetsp.config import load_config
    from hetsp.executor import run_plan
    from hetsp.loading import resolve_config
    from hetsp.planning import Planning
    from hetsp.train import build_runtime, init_distributed, setup_logging
    from solver.simulate import simulate

    cfg = load_config(args.config, args.overrides)
    init_distributed(cfg.run.dist_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    fresh = os.environ.get("COST_MODEL_PROFILE", "")
    if fresh:
        from hetsp.train import profile

        profile(cfg, Path(fresh))  # builds its own runtime, as `hetsp-launch --profile` does
        dist.barrier()
        cfg = load_config(args.config, [*args.overrides, f"planner.profile_path='{fresh}'"])
    rt = build_runtime(resolve_config(cfg))
    planning = Planning(cfg, rt.data, world, rank)
    kernel = kernel_for_config(cfg.attention, rt.device)
    steps = cfg.train.steps
    out = None
    if rank == 0:
        path = Path(cfg.run.output_dir) / cfg.run.name / "micro_batches.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        out = open(path, "w")
    errors = []
    try:
        for step in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            batch = rt.data.train_batch(step)
            plan = planning.plan_for(step)
            batch = planning.kept(plan, batch)
            if step + 1 < steps:
                planning.prefetch(step + 1)
            t_run = time.perf_counter()
            res = run_plan(rt.engine, plan, batch, rank, world, rt.device, rt.objective, kernel)
            t_step = time.perf_counter()
            rt.engine.step()
            dist.all_reduce(torch.zeros(3, dtype=torch.float64))
            t_end = time.perf_counter()
            mixers = getattr(rt.engine.module, "mixer_metrics", dict)()  # SeqBoat's activated share, last micro-batch
            mine = {"mixers": mixers, "spans": res.micro_batch_s, "cpu": res.micro_batch_cpu_s, "before_run_s": t_run - t0,
                    "engine_step_s": t_end - t_step, "step_s": t_end - t0}
            every = [None] * world
            dist.all_gather_object(every, mine)
            if rank != 0:
                continue
            cm = planning.planner.cost_model(world)
            sim = simulate(plan, cm, world)
            measured = max(r["step_s"] for r in every)
            est = plan.meta.get("est_time_s")
            mbs = []
            prev_end = 0.0
            for m, mb in enumerate(plan.micro_batches):
                end = max(r["spans"][m][1] for r in every)
                groups = [{"size": g.size, "start": g.start, "lengths": [plan.lengths[s] for s in g.seqs]}
                          for g in mb.groups if g.seqs]
                mbs.append({
                    "groups": groups,
                    "predicted_s": sim.micro_batches[m].time_s,
                    "group_predicted_s": sim.micro_batches[m].group_times_s,
                    "span_s": end - prev_end,
                    "rank_s": [r["spans"][m][1] - r["spans"][m][0] for r in every],
                    "rank_cpu_s": [r["cpu"][m] for r in every],
                })
                prev_end = end
            rec = {"step": step, "est_time_s": est, "step_time_s": measured, "step_cost_s": cm.step_s,
                   "engine_step_s": max(r["engine_step_s"] for r in every),
                   "before_run_s": max(r["before_run_s"] for r in every), "micro_batches": mbs,
                   "mixers": [r["mixers"] for r in every]}
            if out is not None:
                out.write(json.dumps(rec) + "\n")
                out.flush()
            if est:
                errors.append(abs(est - measured) / measured)
            active = ", ".join(f"{k} {100 * v:.0f}%" for k, v in every[0]["mixers"].items())
            print(f"step {step}: predicted {est or float('nan'):.2f} s, measured {measured:.2f} s "
                  f"(engine step {rec['engine_step_s']:.2f} s, before run {rec['before_run_s']:.2f} s)"
                  + (f"; activated on rank 0: {active}" if active else ""))
            for m, x in enumerate(mbs):
                desc = " + ".join(f"{g['size']}x[{','.join(map(str, g['lengths']))}]" for g in x["groups"])
                print(f"  mb {m}: predicted {x['predicted_s']:.2f} s, measured span {x['span_s']:.2f} s; ranks busy "
                      + " ".join(f"{t:.2f}" for t in x["rank_s"]) + " s, cpu " + " ".join(f"{t:.2f}" for t in x["rank_cpu_s"])
                      + f" s; {desc}")
        if rank == 0 and errors:
            print(f"relative error of the predicted step time: median {100 * statistics.median(errors[1:] or errors):.0f}% "
                  f"over {len(errors[1:] or errors)} steps (first left out)")
    finally:
        planning.close()
        if out is not None:
            out.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
