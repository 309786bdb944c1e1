"""Checkpoints: model, optimizer, scheduler (DeepSpeed), plus step, data position and RNG.

Layout of a run folder's checkpoints::

    RUN/checkpoints/latest                  DeepSpeed's pointer to the newest tag
    RUN/checkpoints/step00000020/...        DeepSpeed model/optimizer/scheduler states
    RUN/checkpoints/step00000020/rng_rank{r}.pt   every rank's RNG states
    RUN/checkpoints/step00000020/hetsp_meta.json  step, epoch, vocab size, world size
    RUN/checkpoints/hetsp_meta.json         copy of the newest tag's meta

The data position is the step itself: every rank derives a batch from
(seed, step), so resuming at step t needs no replay.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save(engine: Any, run_dir: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Save after `step` completed steps (collective: every rank calls it)."""
    ckpt = checkpoint_dir(run_dir)
    tag = tag_for(step)
    # With frozen parameters (LoRA) only the trained ones are saved; the rest come from model.init_from.
    engine.save_checkpoint(str(ckpt), tag=tag, client_state={"hetsp_step": step},
                           exclude_frozen_parameters=_has_frozen(engine))
    rank = dist.get_rank()
    torch.save(_rng_state(), ckpt / tag / f"rng_rank{rank}.pt")
    if rank == 0:
        full = dict(meta, step=step, tag=tag)
        (ckpt / tag / "hetsp_meta.json").write_text(json.dumps(full, indent=1))
        (ckpt / "hetsp_meta.json").write_text(json.dumps(full, indent=1))
        _prune(ckpt, keep)
    dist.barrier()
    return ckpt / tag


def _prune(ckpt: Path, keep: int) -> None:
    if keep <= 0:
        return
    tags = sorted(p for p in ckpt.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _has_frozen(engine: Any) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


def latest_step(run_dir: Path) -> int | None:
    """Completed steps of the newest checkpoint in `run_dir`, or None."""
    latest = checkpoint_dir(run_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    meta = checkpoint_dir(run_dir) / tag / "hetsp_meta.json"
    if not meta.is_file():
        return None
    return int(json.loads(meta.read_text())["step"])


def load(engine: Any, run_dir: Path) -> int:
    """Restore the newest checkpoint into `engine` and this rank's RNG; return its step."""
    ckpt = checkpoint_dir(run_dir)
    step = latest_step(run_dir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt}")
    tag = tag_for(step)
    path, _ = engine.load_checkpoint(str(ckpt), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                     load_module_strict=not _has_frozen(engine))
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt / tag}")
    rng_file = ckpt / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return step
