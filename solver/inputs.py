"""Where the inspection tool gets lengths: a file, a training run's data pipeline, or a run folder."""

from __future__ import annotations

import json
from pathlib import Path


def read_lengths_file(path: str | Path) -> list[int]:
    """One positive integer per line; blank lines and ``#`` comments are skipped.

    Raises ValueError naming the file and line of anything else.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"lengths file {p} does not exist")
    out = []
    with p.open() as f:
        for k, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                n = int(text)
            except ValueError:
                raise ValueError(f"{p}, line {k}: {text!r} is not an integer token count") from None
            if n < 1:
                raise ValueError(f"{p}, line {k}: length {n}; every sequence needs at least 1 token")
            out.append(n)
    if not out:
        raise ValueError(f"lengths file {p} holds no lengths")
    return out


def read_run_plans(run_dir: str | Path) -> list[tuple[int, dict]]:
    """``(step, plan dict)`` for every line of ``RUN/plans.jsonl`` (``{"step": int, "plan": Plan.to_dict()}``)."""
    p = Path(run_dir)
    f = p / "plans.jsonl" if p.is_dir() else p
    if not f.is_file():
        raise ValueError(f"{f} does not exist (expected a run folder holding plans.jsonl)")
    out = []
    for k, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step, plan = int(rec["step"]), rec["plan"]
            lengths = [int(x) for x in plan["lengths"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{f}, line {k}: not a plan record ({type(e).__name__}: {e})") from None
        if not lengths or min(lengths) < 1:
            raise ValueError(f"{f}, line {k}: the plan's lengths must be positive and non-empty")
        out.append((step, plan))
    if not out:
        raise ValueError(f"{f} holds no plans")
    return out


def training_batch_lengths(data_cfg, seed: int, first: int, num: int) -> list[tuple[int, list[int]]]:
    """``(step, lengths)`` of training steps first .. first + num - 1: the batches a training run
    with these data settings (`hetsp.config.DataConfig`) and `run.seed` plans, built by the same
    pipeline (tokenizer, bos/eos, long-document policy, held-out split, token budget per batch)."""
    from hetsp.data import build_data

    data = build_data(data_cfg, seed)
    return [(k, data.train_batch_lengths(k)) for k in range(first, first + num)]
