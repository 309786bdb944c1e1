"""The environment the launcher gives every rank, read back in one place (no torch import).

Variables (torchrun's names, plus two of hetsp's own):

    RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE   this rank's position in the job
    MASTER_ADDR, MASTER_PORT                         where the default process group meets
    TORCHELASTIC_RESTART_COUNT                       restarts so far (torchrun only, else 0)
    HETSP_DEVICE         "cpu", "cuda:K" (an explicit device), or "cuda" (under torchrun:
                         the rank takes cuda:(LOCAL_RANK mod the number of visible GPUs))
    HETSP_DIST_BACKEND   "gloo" or "nccl"
    HETSP_RUN_DIR        the run folder named by ``hetsp-launch --run-dir`` (absent otherwise)
    HETSP_HEARTBEAT_DIR, HETSP_HEARTBEAT_INTERVAL_S
                         where and how often each rank's heartbeat thread touches its file
                         (`hetsp.heartbeat`; the launcher watches them)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

DEVICE_VAR = "HETSP_DEVICE"
BACKEND_VAR = "HETSP_DIST_BACKEND"
RUN_DIR_VAR = "HETSP_RUN_DIR"
RANK_MODULE_VAR = "HETSP_RANK_MODULE"


def resolve_device(spec: str, local_rank: int, num_visible_gpus: int) -> str:
    """Turn a HETSP_DEVICE value into a concrete device string ("cpu" or "cuda:K")."""
    if spec == "cpu" or spec.startswith("cuda:"):
        return spec
    if spec == "cuda":
        if num_visible_gpus < 1:
            raise ValueError(f"{DEVICE_VAR}=cuda but no GPU is visible: run with --device cpu")
        return f"cuda:{local_rank % num_visible_gpus}"
    raise ValueError(f"{DEVICE_VAR}={spec!r}: expected 'cpu', 'cuda' or 'cuda:K'")


@dataclass(frozen=True)
class RankEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    restart_count: int
    device: str  # as set by the launcher; pass through resolve_device for "cuda"
    backend: str
    run_dir: str | None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "RankEnv":
        """Read the variables above; a process started without a launcher is rank 0 of 1 on CPU."""
        env = os.environ if environ is None else environ

        def as_int(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None

        world = as_int("WORLD_SIZE", 1)
        port = env.get("MASTER_PORT")
        return cls(
            rank=as_int("RANK", 0),
            local_rank=as_int("LOCAL_RANK", 0),
            world_size=world,
            local_world_size=as_int("LOCAL_WORLD_SIZE", world),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else None,
            restart_count=as_int("TORCHELASTIC_RESTART_COUNT", 0),
            device=env.get(DEVICE_VAR, "cpu"),
            backend=env.get(BACKEND_VAR, "gloo"),
            run_dir=env.get(RUN_DIR_VAR) or None,
        )
