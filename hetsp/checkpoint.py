"""Checkpoints: model, optimizer, scheduler (DeepSpeed), plus step, data position and RNG.

Layout of a run folder's checkpoints::

    RUN/checkpoints/latest                  pointer to the newest tag (DeepSpeed's format)
    RUN/checkpoints/step00000020/...        DeepSpeed model/optimizer/scheduler states
    RUN/checkpoints/step00000020/rng_rank{r}.pt   every rank's RNG states
    RUN/checkpoints/step00000020/hetsp_meta.json  step, world size, vocab size, every file's size
    RUN/checkpoints/hetsp_meta.json         copy of the newest tag's meta
    RUN/checkpoints/.partial/               a checkpoint being written

A checkpoint becomes visible only when complete: every rank writes into
``.partial/TAG``; after a barrier rank 0 records the size of every file in the
meta, renames the folder to ``TAG`` and only then moves the pointer. A crash
at any moment leaves either the previous checkpoints untouched or the new one
whole.

Resuming takes the newest checkpoint whose files are all present with the sizes
recorded in its meta; a newer one that is not (a truncated or missing file) is
named and skipped, and the resume says which one it fell back to. When
checkpoints exist but none is complete, resuming stops with an error naming
what is wrong: it never starts over silently. A checkpoint is bound to the
world size that wrote it (ZeRO partitions per rank); another world size is
refused before loading, with the command that would resume.

The data position is the step itself: every rank derives a batch from
(seed, step), so resuming at step t needs no replay.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

META = "hetsp_meta.json"
STAGING = ".partial"


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be resumed; the message says what is wrong with each."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _rng_state() -> dict[str, Any]:
    import torch

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
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine: Any, run_dir: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Save after `step` completed steps (collective: every rank calls it); see the module docstring."""
    import torch
    import torch.distributed as dist

    ckpt = checkpoint_dir(run_dir)
    staging = ckpt / STAGING
    tag = tag_for(step)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)  # what an interrupted save left
    dist.barrier()
    # With frozen parameters (LoRA) only the trained ones are saved; the rest come from model.init_from.
    engine.save_checkpoint(str(staging), tag=tag, client_state={"hetsp_step": step}, save_latest=False,
                           exclude_frozen_parameters=_has_frozen(engine))
    torch.save(_rng_state(), staging / tag / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's files are written
    if rank == 0:
        part = staging / tag
        files = {p.relative_to(part).as_posix(): p.stat().st_size for p in sorted(part.rglob("*")) if p.is_file()}
        full = dict(meta, step=step, tag=tag, files=files)
        _write_atomic(part / META, json.dumps(full, indent=1))
        final = ckpt / tag
        if final.exists():  # the same step saved again (a resumed run that went back)
            shutil.rmtree(final)
        os.rename(part, final)
        for leftover in staging.iterdir():  # DeepSpeed's zero_to_fp32.py, written next to the tags
            if leftover.is_file():
                os.replace(leftover, ckpt / leftover.name)
        shutil.rmtree(staging, ignore_errors=True)
        _write_atomic(ckpt / "latest", tag)
        _write_atomic(ckpt / META, json.dumps(full, indent=1))
        _prune(ckpt, keep)
    dist.barrier()
    return ckpt / tag


def _tags(ckpt: Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    if not ckpt.is_dir():
        return []
    return sorted(p for p in ckpt.iterdir() if p.is_dir() and p.name.startswith("step"))


def _prune(ckpt: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in _tags(ckpt)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def problems(tag_dir: Path) -> list[str]:
    """What makes the checkpoint in `tag_dir` unusable (empty: complete)."""
    meta_path = tag_dir / META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return [f"{meta_path} is missing (the checkpoint was not completed)"]
    except (OSError, ValueError) as e:
        return [f"{meta_path} cannot be read ({e})"]
    files = meta.get("files")
    if not isinstance(files, dict):
        return [f"{meta_path} lists no files (written by an older hetsp); its completeness cannot be checked"]
    out = []
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            out.append(f"{path} is missing")
        elif path.stat().st_size != size:
            out.append(f"{path} has {path.stat().st_size} bytes but {size} were written (truncated or damaged)")
    world = meta.get("world_size")
    if isinstance(world, int):
        out += [f"{tag_dir / f'rng_rank{r}.pt'} (RNG state of rank {r}) is missing"
                for r in range(world) if f"rng_rank{r}.pt" not in files]
    return out


def _has_frozen(engine: Any) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


@dataclass
class Resumable:
    """The checkpoint a resume uses (`tag` None: there is none), and what was skipped on the way."""

    tag: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def step(self) -> int | None:
        return None if self.tag is None else int(self.meta["step"])


def find_resumable(run_dir: Path) -> Resumable:
    """The newest complete checkpoint of `run_dir`; CheckpointError when some exist but none is complete."""
    ckpt = checkpoint_dir(run_dir)
    found = Resumable()
    staging = ckpt / STAGING
    if staging.is_dir():
        for part in sorted(p for p in staging.iterdir() if p.is_dir()):
            found.notes.append(f"{part} is a checkpoint that was being written when the run stopped: ignored")
    skipped = []
    for tag_dir in reversed(_tags(ckpt)):
        bad = problems(tag_dir)
        if not bad:
            found.tag = tag_dir
            found.meta = json.loads((tag_dir / META).read_text())
            if skipped:
                found.notes.append(f"resuming from the previous complete checkpoint {tag_dir.name} instead")
            return found
        skipped.append(tag_dir)
        found.notes.append(f"checkpoint {tag_dir.name} is incomplete: {'; '.join(bad)}")
    if skipped:
        raise CheckpointError(
            f"no complete checkpoint in {ckpt}: {' '.join(found.notes)}. Restore the files, or move the "
            "checkpoints away to start over"
        )
    return found


def check_world_size(found: Resumable, world_size: int, relaunch: Callable[[int], str] | None = None) -> None:
    """ValueError, with the command that would work, when `found` was written by another world size."""
    saved = found.meta.get("world_size")
    if found.tag is None or saved is None or saved == world_size:
        return
    how = f"run `{relaunch(saved)}`" if relaunch else f"resume with {saved} ranks"
    raise ValueError(
        f"checkpoint {found.tag} was written by {saved} ranks but this job has {world_size}; ZeRO's "
        f"optimizer partitions belong to {saved} ranks, so {how} (or start a new run in another folder)"
    )


def check_resumable(run_dir: Path, world_size: int, relaunch: Callable[[int], str] | None = None) -> Resumable:
    """The launcher's check before a resume: a checkpoint to use (or none) that fits `world_size`."""
    found = find_resumable(run_dir)
    check_world_size(found, world_size, relaunch)
    return found


def load(engine: Any, found: Resumable) -> int:
    """Restore the checkpoint `found` into `engine` and this rank's RNG; return its step."""
    import torch
    import torch.distributed as dist

    assert found.tag is not None
    check_world_size(found, dist.get_world_size())
    rng_file = found.tag / f"rng_rank{dist.get_rank()}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: the RNG state of rank {dist.get_rank()} is part of the "
                                "checkpoint, and resuming without it would not continue exactly")
    try:
        path, _ = engine.load_checkpoint(str(found.tag.parent), tag=found.tag.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True, load_module_strict=not _has_frozen(engine))
    except Exception as e:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {found.tag}: {type(e).__name__}: {e}") from e
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {found.tag}")
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return found.step


def resume(engine: Any, run_dir: Path, announce: bool, log: Any) -> int:
    """Load the newest complete checkpoint of `run_dir` if there is one; return the step to start from."""
    found = find_resumable(run_dir)
    if announce:
        for note in found.notes:
            log.warning("%s", note)
    if found.tag is None:
        if announce:
            log.warning("resume: no checkpoint in %s, starting from step 0", checkpoint_dir(run_dir))
        return 0
    step = load(engine, found)
    if announce:
        log.info("resumed from step %d (%s)", step, found.tag)
    return step
