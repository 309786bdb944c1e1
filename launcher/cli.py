"""Command-line arguments of hetsp-launch and their checks (no torch import)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from .rank_env import RANK_MODULE_VAR

DEFAULT_MODULE = "hetsp.train"


class UsageError(ValueError):
    """Arguments that do not fit together; the launcher prints it and exits 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hetsp-launch",
        description="Start hetsp's ranks: --simulate N ranks on this host, or a multi-node job "
        "through torchrun (--nnodes ...). Runs `python -m hetsp.train CONFIG ...` on every rank.",
    )
    p.add_argument("config", metavar="CONFIG", help="TOML run config (configs/*.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=20 (repeatable)")
    p.add_argument("--simulate", type=int, metavar="N", help="run N ranks on this host")
    p.add_argument("--all-ranks", action="store_true", help="show every rank's output, not only rank 0's")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    p.add_argument("--dry-run", action="store_true",
                   help="run the rank program once in this process, with WORLD_SIZE set, without distributed")
    p.add_argument("--profile", metavar="OUT.json",
                   help="instead of training, measure the planner's cost table on these ranks and write it")
    p.add_argument("--run-dir", metavar="DIR",
                   help="run folder: exported to ranks as HETSP_RUN_DIR; every rank's full output goes to DIR/logs/")
    p.add_argument("--force", action="store_true",
                   help="start even when the ranks' estimated memory exceeds this host's or ranks far exceed cores")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where ranks compute (auto: CUDA when torch sees a GPU)")
    p.add_argument("--finish-grace", type=float, default=600.0, metavar="SECONDS",
                   help="--simulate: once a rank has exited 0, how long the others may still run before the "
                   "job is stopped as hung (default 600)")
    g = p.add_argument_group("multi-node (through torchrun)")
    g.add_argument("--nnodes", type=int, metavar="K", help="number of nodes")
    g.add_argument("--node-rank", type=int, metavar="I", help="this node's index, 0..K-1")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="c10d rendezvous endpoint (same on every node)")
    g.add_argument("--nproc-per-node", type=int, metavar="P", help="ranks on each node (default: GPUs, or 1)")
    g.add_argument("--max-restarts", type=int, metavar="R", help="torchrun restarts of the whole worker group")
    # Lets tests run small rank programs instead of hetsp.train.
    p.add_argument("--module", default=os.environ.get(RANK_MODULE_VAR, DEFAULT_MODULE), help=argparse.SUPPRESS)
    return p


@dataclass(frozen=True)
class LaunchArgs:
    config: str
    overrides: tuple[str, ...]
    mode: str  # "simulate" | "torchrun"
    num_ranks: int | None  # simulate: N
    all_ranks: bool
    resume: bool
    dry_run: bool
    profile: str | None
    run_dir: str | None
    device: str
    module: str
    nnodes: int
    node_rank: int
    rdzv_endpoint: str | None
    nproc_per_node: int | None  # None: decided from the GPUs
    max_restarts: int
    finish_grace_s: float
    force: bool = False

    def rank_args(self) -> list[str]:
        """Arguments of the rank program: CONFIG [--set k=v ...] [--resume] [--dry-run] [--profile OUT]."""
        args = [self.config]
        for text in self.overrides:
            args += ["--set", text]
        if self.resume:
            args.append("--resume")
        if self.dry_run:
            args.append("--dry-run")
        if self.profile:
            args += ["--profile", self.profile]
        return args


def parse_args(argv: list[str] | None) -> LaunchArgs:
    """Parse and check; argparse errors exit 2, conflicting options raise `UsageError`."""
    ns = build_parser().parse_args(argv)
    multi = {
        "--nnodes": ns.nnodes, "--node-rank": ns.node_rank, "--rdzv-endpoint": ns.rdzv_endpoint,
        "--nproc-per-node": ns.nproc_per_node, "--max-restarts": ns.max_restarts,
    }
    given = [k for k, v in multi.items() if v is not None]
    if ns.simulate is not None:
        if given:
            raise UsageError(f"--simulate runs on this host only; drop {', '.join(given)} or drop --simulate")
        if ns.simulate < 1:
            raise UsageError(f"--simulate {ns.simulate}: need at least 1 rank")
    if ns.finish_grace <= 0:
        raise UsageError(f"--finish-grace {ns.finish_grace}: must be positive (seconds)")
    mode = "torchrun" if given else "simulate"
    nnodes = 1 if ns.nnodes is None else ns.nnodes
    node_rank = 0 if ns.node_rank is None else ns.node_rank
    if mode == "torchrun":
        if nnodes < 1:
            raise UsageError(f"--nnodes {nnodes}: need at least 1 node")
        if not 0 <= node_rank < nnodes:
            raise UsageError(f"--node-rank {node_rank} is outside 0..{nnodes - 1} (--nnodes {nnodes})")
        if nnodes > 1 and ns.rdzv_endpoint is None:
            raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        if ns.rdzv_endpoint is not None:
            host, sep, port = ns.rdzv_endpoint.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise UsageError(f"--rdzv-endpoint {ns.rdzv_endpoint!r}: expected HOST:PORT, e.g. 10.0.0.1:29400")
        if ns.nproc_per_node is not None and ns.nproc_per_node < 1:
            raise UsageError(f"--nproc-per-node {ns.nproc_per_node}: need at least 1")
        if ns.max_restarts is not None and ns.max_restarts < 0:
            raise UsageError(f"--max-restarts {ns.max_restarts}: must be 0 or more")
    return LaunchArgs(
        config=ns.config,
        overrides=tuple(ns.overrides),
        mode=mode,
        num_ranks=1 if mode == "simulate" and ns.simulate is None else ns.simulate,
        all_ranks=ns.all_ranks,
        resume=ns.resume,
        dry_run=ns.dry_run,
        profile=ns.profile,
        run_dir=ns.run_dir,
        device=ns.device,
        module=ns.module,
        nnodes=nnodes,
        node_rank=node_rank,
        rdzv_endpoint=ns.rdzv_endpoint,
        nproc_per_node=ns.nproc_per_node,
        max_restarts=0 if ns.max_restarts is None else ns.max_restarts,
        finish_grace_s=ns.finish_grace,
        force=ns.force,
    )
