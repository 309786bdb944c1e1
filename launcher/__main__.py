"""hetsp-launch: check the config, then start the ranks (simulated on this host, or via torchrun).

Exit status: 0 success; 1 a rank (or torchrun) failed; 2 bad arguments or config;
128+signal when stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import os
import sys

from hetsp.config import ConfigError, load_config

from .cli import LaunchArgs, UsageError, parse_args
from .devices import count_gpus, simulated_arrangement, threads_per_rank, torchrun_arrangement, available_cores
from .rank_env import BACKEND_VAR, DEVICE_VAR, RUN_DIR_VAR
from .ranks import log

USAGE_EXIT = 2


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before any rank started
        print("hetsp-launch: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    try:
        args = parse_args(argv)
        load_config(args.config, list(args.overrides))  # fail here, before any rank starts
        num_gpus = count_gpus(args.device)
    except (UsageError, ConfigError, ValueError) as e:
        print(f"hetsp-launch: error: {e}", file=sys.stderr)
        return USAGE_EXIT
    if args.mode == "simulate":
        return _simulate(args, num_gpus)
    return _torchrun(args, num_gpus)


def _threads(ranks_on_host: int) -> int:
    """OMP_NUM_THREADS per rank: the user's value when set, else cores / ranks (at least 1)."""
    user = os.environ.get("OMP_NUM_THREADS", "")
    if user.isdigit() and int(user) > 0:
        return int(user)
    return threads_per_rank(ranks_on_host)


def _simulate(args: LaunchArgs, num_gpus: int) -> int:
    from .simulate import run_simulated

    n = args.num_ranks
    assert n is not None
    if args.dry_run:
        return _dry_run(args, world=n, local_world=n)
    arrangement = simulated_arrangement(n, num_gpus)
    threads = _threads(n)
    log(f"simulating {n} rank(s) on this host: {arrangement.reason}; OMP_NUM_THREADS={threads} "
        f"({available_cores()} core(s)); running `python -m {args.module}`")
    return run_simulated(args.module, args.rank_args(), n, arrangement, threads=threads,
                         all_ranks=args.all_ranks, run_dir=args.run_dir, finish_grace_s=args.finish_grace_s)


def _torchrun(args: LaunchArgs, num_gpus: int) -> int:
    from .torchrun import run_torchrun

    nproc = args.nproc_per_node or max(1, num_gpus)
    if args.dry_run:
        return _dry_run(args, world=args.nnodes * nproc, local_world=nproc)
    arrangement = torchrun_arrangement(nproc, num_gpus)
    threads = _threads(nproc)
    log(f"node {args.node_rank} of {args.nnodes}, {nproc} rank(s) per node: {arrangement.reason}; "
        f"OMP_NUM_THREADS={threads}")
    return run_torchrun(args.module, args.rank_args(), nnodes=args.nnodes, node_rank=args.node_rank,
                        nproc_per_node=nproc, rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts,
                        arrangement=arrangement, threads=threads, all_ranks=args.all_ranks, run_dir=args.run_dir)


def _dry_run(args: LaunchArgs, *, world: int, local_world: int) -> int:
    """Replace this process by one rank program with --dry-run: WORLD_SIZE set, no process group."""
    env = dict(os.environ)
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(local_world),
               PYTHONUNBUFFERED="1")
    env[DEVICE_VAR] = "cpu"
    env[BACKEND_VAR] = "gloo"
    if args.run_dir is not None:
        env[RUN_DIR_VAR] = args.run_dir
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # a dry run must not meet other ranks
        env.pop(name, None)
    argv = [sys.executable, "-m", args.module, *args.rank_args()]
    log(f"dry run for a world of {world} rank(s), on CPU: `python -m {args.module}` in this process")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
