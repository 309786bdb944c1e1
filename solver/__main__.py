"""``python -m solver`` / ``hetsp-plan``: plan batches and show the plans next to the baselines.

Examples::

    hetsp-plan --lengths ../shared/data/lengths/wikipedia.txt --ranks 64 --cost-model flexsp \\
        --flexsp-model 7b --memory-gb 30 --group-sizes 2,4,8,16,64 --round-to 128 --max-length 191872 \\
        --batch-size 512 --num-batches 5
    hetsp-plan --run runs/default --ranks 4 --config configs/default.toml --json
    hetsp-plan --dataset data.jsonl --config configs/default.toml --ranks 4 --plot plan.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from hetsp.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetsp-plan", description="Plan batches of sequences over ranks; compare planners.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lengths", metavar="FILE", help="sequence lengths, one integer per line")
    src.add_argument("--dataset", help="a datasets dataset (local file/folder or cached hub name): plan the "
                     "training batches a run with the config's data section (and run.seed) would plan")
    src.add_argument("--run", metavar="DIR", help="a training run folder: re-plan the batches in its plans.jsonl")
    p.add_argument("--tokenizer", help="with --dataset: data.tokenizer ('bytes' or a local tokenizer folder)")
    p.add_argument("--split", help="with --dataset: data.split")
    p.add_argument("--text-field", help="with --dataset: data.text_field")
    p.add_argument("--dataset-config", help="with --dataset: data.dataset_config")
    p.add_argument("--step", type=int, default=None, help="with --run: only this step")
    p.add_argument("--batch-size", type=int, default=0,
                   help="sequences per batch (0: all in one batch); with --dataset the batches are the run's (data.tokens_per_batch)")
    p.add_argument("--num-batches", type=int, default=1)
    p.add_argument("--first-batch", type=int, default=0)
    p.add_argument("--round-to", type=int, default=1, help="round each length up to a multiple of this")
    p.add_argument("--max-length", type=int, default=0, help="drop (rounded) lengths above this before batching")
    p.add_argument("--bundle-size", type=int, default=1,
                   help="each K consecutive sequences of a batch are one bundle (the completions of a prompt), kept in one micro-batch")
    p.add_argument("--config", help="a hetsp TOML config (its cluster, planner and model sections are used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--planner", help="planner name (default: the config's, else milp)")
    p.add_argument("--ranks", type=int, help="number of ranks (with --run: taken from the plans when omitted)")
    p.add_argument("--ranks-per-node", type=int)
    p.add_argument("--tokens-per-rank", type=int)
    p.add_argument("--memory-gb", type=float)
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--cost-model", choices=["ring", "profile", "flexsp"])
    p.add_argument("--flexsp-model", choices=["7b", "13b", "30b"])
    p.add_argument("--profile", help="a measured cost profile (JSON)")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="the device the run trains on: with train.dtype 'auto', bf16 on gpu and fp32 on cpu")
    p.add_argument("--group-sizes", help="allowed group sizes, comma separated (default: all)")
    p.add_argument("--time-limit", type=float, help="planner time limit per batch (s)")
    p.add_argument("--drop-long", action="store_true", help="drop sequences that fit no group (default: error)")
    p.add_argument("--static-fill", type=float, default=None, help="static baselines' budget fraction (flexsp: 0.9)")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--plot", metavar="FILE.png", help="draw the plan of each batch (FILE_k.png for batch k > 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="log which paths the planner takes")
    return p


class UsageError(ValueError):
    pass


def _configs(args):
    from hetsp.planning import planner_config

    cfg = load_config(args.config, args.set) if (args.config or args.set) else load_config(None)
    # the planner as training makes it: the train section's ZeRO stage, dtype and checkpointing in its options
    cl, pl, model = cfg.cluster, planner_config(cfg, args.device == "gpu"), cfg.model
    if args.ranks_per_node is not None:
        cl.ranks_per_node = args.ranks_per_node
    if args.tokens_per_rank is not None:
        cl.tokens_per_rank = args.tokens_per_rank
    if args.memory_gb is not None:
        cl.memory_per_rank_gb = args.memory_gb
    if args.peak_tflops is not None:
        cl.peak_tflops = args.peak_tflops
    if args.cost_model:
        pl.cost_model = args.cost_model
    if args.flexsp_model:
        pl.flexsp_model = args.flexsp_model
    if args.profile:
        pl.profile_path = args.profile
        if not args.cost_model:
            pl.cost_model = "profile"
    if args.group_sizes:
        try:
            pl.allowed_group_sizes = [int(x) for x in args.group_sizes.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--group-sizes {args.group_sizes!r}: expected integers separated by commas") from None
    if args.time_limit is not None:
        pl.time_limit_s = args.time_limit
    if args.drop_long:
        pl.long_policy = "drop"
    name = args.planner or (pl.name if args.config else "milp")
    return name, pl, cl, model, cfg


def _batches(args, cfg) -> tuple[list[tuple[int, list[int], dict | None]], int | None]:
    """``(index, lengths, recorded plan dict or None)`` per batch, and the world size a run used."""
    from .inputs import read_lengths_file, read_run_plans, training_batch_lengths

    ranks_hint = None
    if not args.dataset:
        given = [f for f, v in (("--tokenizer", args.tokenizer), ("--split", args.split), ("--text-field", args.text_field),
                                ("--dataset-config", args.dataset_config)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to --dataset")
    if args.run:
        recs = read_run_plans(args.run)
        if args.step is not None:
            recs = [r for r in recs if r[0] == args.step]
            if not recs:
                raise UsageError(f"--step {args.step}: no such step in {args.run}")
        ranks_hint = max(g["start"] + g["size"] for _, p in recs for mb in p["micro_batches"] for g in mb)
        return [(step, [int(x) for x in p["lengths"]], p) for step, p in recs], ranks_hint
    if args.dataset:
        # exactly the training run's batches: its data pipeline, not a second one
        given = [f for f, v in (("--batch-size", args.batch_size), ("--round-to", args.round_to != 1),
                                ("--max-length", args.max_length)) if v]
        if given:
            raise UsageError(f"{', '.join(given)} change the lengths a training run plans; with --dataset use the "
                             "config's data section (data.tokens_per_batch, data.max_seq_len, data.long_policy)")
        if args.num_batches < 1 or args.first_batch < 0:
            raise UsageError("--num-batches must be >= 1 and --first-batch >= 0")
        data = dataclasses.replace(cfg.data, dataset=args.dataset, **{
            k: v for k, v in (("tokenizer", args.tokenizer), ("split", args.split), ("text_field", args.text_field),
                              ("dataset_config", args.dataset_config)) if v is not None})
        return [(k, b, None) for k, b in training_batch_lengths(data, cfg.run.seed, args.first_batch, args.num_batches)], None
    lengths = read_lengths_file(args.lengths)
    if args.round_to < 1:
        raise UsageError(f"--round-to must be >= 1, got {args.round_to}")
    r = args.round_to
    lengths = [(n + r - 1) // r * r for n in lengths]
    if args.max_length:
        lengths = [n for n in lengths if n <= args.max_length]
        if not lengths:
            raise UsageError(f"every length is over --max-length {args.max_length}")
    if args.batch_size < 0 or args.num_batches < 1 or args.first_batch < 0:
        raise UsageError("--batch-size must be >= 0, --num-batches >= 1 and --first-batch >= 0")
    if not args.batch_size:
        return [(0, lengths, None)], None
    out = []
    for k in range(args.first_batch, args.first_batch + args.num_batches):
        b = lengths[k * args.batch_size : (k + 1) * args.batch_size]
        if not b:
            break
        out.append((k, b, None))
    if not out:
        raise UsageError(f"batch {args.first_batch} is past the end of the {len(lengths)} lengths")
    return out, None


def run(args) -> int:
    from .compare import BASELINES, compare_batch
    from .report import comparison_table, plan_table, summary_table

    name, pl, cl, model, cfg = _configs(args)
    batches, ranks_hint = _batches(args, cfg)
    num_ranks = args.ranks or ranks_hint
    if not num_ranks:
        raise UsageError("--ranks is required")
    if num_ranks < 1:
        raise UsageError(f"--ranks must be >= 1, got {num_ranks}")
    if cl.ranks_per_node > num_ranks:
        raise UsageError(
            f"ranks per node ({cl.ranks_per_node}) is more than the {num_ranks} ranks; "
            "use --ranks-per-node <= --ranks (0: one node)"
        )
    fill = args.static_fill if args.static_fill is not None else (0.9 if pl.cost_model == "flexsp" else 1.0)
    baselines = () if args.no_baselines else BASELINES
    reports = []
    from hetsp.plan import Plan

    if args.bundle_size < 1:
        raise UsageError(f"--bundle-size must be >= 1, got {args.bundle_size}")
    for k, lengths, recorded in batches:
        rec = Plan.from_dict(recorded) if recorded is not None else None
        if rec is not None and rec.bundles:
            bundles = [list(b) for b in rec.bundles]
        elif args.bundle_size > 1:
            bundles = [list(range(i, min(i + args.bundle_size, len(lengths)))) for i in range(0, len(lengths), args.bundle_size)]
        else:
            bundles = None
        reports.append(compare_batch(k, lengths, num_ranks, name, pl, cl, model, baselines, fill, rec, bundles))
    from . import get_planner

    cm = get_planner(name, pl, cl, model).cost_model(num_ranks)
    if args.plot:
        from .plot import plot_plan

        stem = Path(args.plot)
        for j, rep in enumerate(reports):
            path = stem if j == 0 else stem.with_name(f"{stem.stem}_{j}{stem.suffix or '.png'}")
            plot_plan(rep.plan, cm, num_ranks, str(path), f"batch {rep.index}: {rep.rows[name]['est_s']:.3f} s")
    measured = _recorded_prediction(args.run) if args.run else None
    if args.json:
        totals = {n: sum(r.rows[n]["est_s"] for r in reports) for n in reports[0].rows}
        print(
            json.dumps(
                {
                    "planner": name,
                    "num_ranks": num_ranks,
                    "cost_model": cm.describe(),
                    "batches": [r.to_dict() for r in reports],
                    "totals": totals,
                    "lower_bound_total_s": sum(r.bound["total_s"] for r in reports),
                    **({"recorded_prediction": measured} if args.run else {}),
                }
            )
        )
        return 0
    print(f"planner {name} on {num_ranks} ranks, cost model {json.dumps(cm.describe())}")
    for rep in reports:
        meta = rep.plan.meta
        print(f"\n=== batch {rep.index}: {len(rep.lengths)} sequences, {sum(rep.lengths)} tokens"
              + (f", {len(rep.plan.bundles)} bundles (b<k> in the tables)" if rep.plan.bundles else ""))
        if rep.plan.dropped:
            print(f"dropped {len(rep.plan.dropped)} sequence(s) that fit no group: {list(rep.plan.dropped[:10])}")
        print(plan_table(rep, cm, num_ranks))
        print()
        print(comparison_table(rep))
    if len(reports) > 1:
        print("\n=== estimated step time (s) per batch")
        print(summary_table(reports))
    if args.run:
        from hetsp.metrics.prediction import format_prediction

        print(f"\n=== the run's own plans: {format_prediction(measured)}")
    return 0


def _recorded_prediction(run_dir: str) -> dict | None:
    """Median and worst relative error of the run's recorded predicted step times (None: none recorded)."""
    from hetsp.metrics.jsonl import read_jsonl
    from hetsp.metrics.prediction import prediction_errors

    path = Path(run_dir) / "metrics.jsonl"
    return prediction_errors(read_jsonl(path)) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from hetsp.plan import PlanError

    try:
        return run(args)
    except (ValueError, ConfigError, PlanError, OSError) as e:
        print(f"hetsp-plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
