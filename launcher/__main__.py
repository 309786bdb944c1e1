"""hetsp-launch: check the config, then start the ranks (simulated on this host, or via torchrun).

Before any rank starts: the config and every check that needs no process group
(`hetsp.checks.check_run`, the same function the ranks run), a resume's checkpoint
(world size), the host's memory and cores, and the run folder's lock.

Exit status: 0 success; 1 a rank (or torchrun) failed or hung; 2 bad arguments or config,
a run folder in use by another run, or a job this host cannot hold (without --force);
128+signal when stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import os
import sys

from hetsp.config import Config, ConfigError, load_config

from .cli import DEFAULT_MODULE, LaunchArgs, UsageError, parse_args
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
    from hetsp.checks import check_run

    try:
        args = parse_args(argv)
        cfg = load_config(args.config, list(args.overrides))  # fail here, before any rank starts
        if args.mode == "simulate":  # the checks that need no torch, before count_gpus imports it
            check_run(cfg, args.num_ranks, planning=False)
        num_gpus = count_gpus(args.device)
        world, ranks_here = _world(args, num_gpus)
        check_run(cfg, world, planning=not args.profile, on_gpu=num_gpus > 0)
    except (UsageError, ConfigError, ValueError) as e:
        print(f"hetsp-launch: error: {e}", file=sys.stderr)
        return USAGE_EXIT
    if args.dry_run or args.profile:
        return _simulate(args, num_gpus, cfg) if args.mode == "simulate" else _torchrun(args, num_gpus, cfg)
    from hetsp.checkpoint import CheckpointError
    from hetsp.runlock import RunFolderBusy, RunLock, run_folder

    lock = None
    try:
        run_dir = run_folder(cfg.run.output_dir, cfg.run.name, args.run_dir)
        _check_resume(cfg, args, run_dir, world)
        _check_host(cfg, args, ranks_here, num_gpus)
        if args.node_rank == 0:  # one lock per job, on the shared run folder
            lock = RunLock(run_dir).acquire()
    except (ValueError, RunFolderBusy, CheckpointError) as e:
        print(f"hetsp-launch: error: {e}", file=sys.stderr)
        return USAGE_EXIT
    try:
        for note in lock.notes if lock is not None else []:
            log(note)
        if args.mode == "simulate":
            return _simulate(args, num_gpus, cfg)
        return _torchrun(args, num_gpus, cfg)
    finally:
        if lock is not None:
            lock.release()


def _world(args: LaunchArgs, num_gpus: int) -> tuple[int, int]:
    """(ranks in the job, ranks on this host)."""
    if args.mode == "simulate":
        assert args.num_ranks is not None
        return args.num_ranks, args.num_ranks
    nproc = args.nproc_per_node or max(1, num_gpus)
    return args.nnodes * nproc, nproc


def _check_resume(cfg: Config, args: LaunchArgs, run_dir, world: int) -> None:
    """A resume (--resume, run.resume) whose newest checkpoint was written by another world size is
    refused here, with the command that would work."""
    from hetsp.checkpoint import check_resumable

    if args.resume or cfg.run.resume:
        check_resumable(run_dir, world, relaunch=_relaunch_hint(args))


def _relaunch_hint(args: LaunchArgs):
    """The command that resumes on `saved_world` ranks, as a function of that number."""
    import shlex

    rest = shlex.join(args.rank_args())
    if args.mode == "simulate":
        return lambda saved_world: f"hetsp-launch --simulate {saved_world} {rest}"
    return lambda saved_world: (f"hetsp-launch {rest} --nnodes K --nproc-per-node P ... with K x P = "
                                f"{saved_world}")


def _check_host(cfg: Config, args: LaunchArgs, ranks_here: int, num_gpus: int) -> None:
    """hetsp ranks on CPU: refuse (or warn with --force) when this host cannot hold them."""
    if args.module != DEFAULT_MODULE or num_gpus > 0:  # test programs, or ranks on GPUs
        return
    from hetsp.overhead import cached_library_bytes, host_memory, host_problems, process_overhead

    if cached_library_bytes() is None:
        log("measuring once what a rank's libraries take in memory (cached for these versions)")
    overhead = process_overhead(cfg)
    _, available = host_memory()
    problems = host_problems(ranks_here, overhead.total, available, available_cores())
    if not problems:
        return
    text = "; ".join(problems) + f" (per rank: {overhead.describe()})"
    if args.force:
        log(f"warning: {text}; starting anyway (--force)")
        return
    raise ValueError(f"{text}. Use fewer ranks, or --force to start anyway")


def _threads(ranks_on_host: int) -> int:
    """OMP_NUM_THREADS per rank: the user's value when set, else cores / ranks (at least 1)."""
    user = os.environ.get("OMP_NUM_THREADS", "")
    if user.isdigit() and int(user) > 0:
        return int(user)
    return threads_per_rank(ranks_on_host)


def _simulate(args: LaunchArgs, num_gpus: int, cfg: Config) -> int:
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
                         all_ranks=args.all_ranks, run_dir=args.run_dir, finish_grace_s=args.finish_grace_s,
                         stop_grace_s=cfg.run.stop_grace_s, heartbeat_timeout_s=cfg.run.heartbeat_timeout_s)


def _torchrun(args: LaunchArgs, num_gpus: int, cfg: Config) -> int:
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
                        arrangement=arrangement, threads=threads, all_ranks=args.all_ranks, run_dir=args.run_dir,
                        stop_grace_s=cfg.run.stop_grace_s, heartbeat_timeout_s=cfg.run.heartbeat_timeout_s)


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
