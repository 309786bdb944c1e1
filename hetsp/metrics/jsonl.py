"""JSON-lines files of a run folder: read back, append, and cut at a resume point."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("hetsp.metrics")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of `path`; a last line cut short by a crash is skipped (with a warning).

    A malformed line anywhere else is an error naming the file and line.
    """
    lines = Path(path).read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                log.warning("%s: skipping the incomplete last line %d", path, i + 1)
                continue
            raise ValueError(f"{path}, line {i + 1}: not valid JSON ({e})") from None
    return records


def truncate_from_step(path: Path, start_step: int) -> list[dict[str, Any]]:
    """Keep only the records of `path` with step < start_step (rewritten atomically); return them."""
    path = Path(path)
    if not path.exists():
        return []
    records = read_jsonl(path)
    kept = [r for r in records if r.get("step", -1) < start_step]
    if len(kept) != len(records):
        log.info("%s: dropping %d records from step %d on (resumed run)", path.name, len(records) - len(kept), start_step)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept


def dumps(record: dict[str, Any]) -> str:
    """One JSON line (no NaN: non-finite floats become null so every reader can parse it)."""
    return json.dumps(_finite(record), separators=(",", ":")) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
