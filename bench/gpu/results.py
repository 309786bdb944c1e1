"""The check's result folder: one JSON file and one Markdown file (`gpu_results/`).

Each step adds a `StepResult`: a status (ok, fail, skip, timeout), its one summary line, its
seconds and, optionally, tables (lists of rows, each a dict of column -> value) and free data.
The Markdown file has a summary table of the steps, then every step's tables, ready to paste
into bench/results/ or the README.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("ok", "fail", "skip", "timeout")
JSON_NAME = "results.json"
MD_NAME = "results.md"


@dataclass
class StepResult:
    name: str
    status: str
    summary: str
    seconds: float = 0.0
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"step {self.name!r}: status {self.status!r} is not one of {STATUSES}")
        if "\n" in self.summary:
            raise ValueError(f"step {self.name!r}: the summary must be one line")

    def line(self) -> str:
        return f"[{self.status:>7}] {self.name:<12} {self.seconds:6.1f}s  {self.summary}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepResult":
        return cls(**{k: d[k] for k in ("name", "status", "summary", "seconds", "tables", "data") if k in d})


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.3f}".rstrip("0").rstrip(".")
    if v is None:
        return "n/a"
    return str(v).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table whose columns are the union of the rows' keys, in first-seen order."""
    if not rows:
        return "(no rows)\n"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    out += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_results(out_dir: Path, steps: list[StepResult], meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write results.json and results.md under `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / JSON_NAME
    js.write_text(json.dumps({"meta": meta, "steps": [asdict(s) for s in steps]}, indent=1, default=str) + "\n")
    md = [f"# GPU check: {meta.get('device', 'unknown device')}", ""]
    md += [f"- {k}: {v}" for k, v in meta.items() if k != "device"]
    md += ["", markdown_table([{"step": s.name, "status": s.status, "seconds": round(s.seconds, 1),
                                "summary": s.summary} for s in steps])]
    for s in steps:
        for title, rows in s.tables.items():
            md += [f"## {s.name}: {title}", "", markdown_table(rows)]
    (out_dir / MD_NAME).write_text("\n".join(md))
    return js, out_dir / MD_NAME


def read_results(out_dir: Path) -> tuple[dict[str, Any], list[StepResult]]:
    d = json.loads((out_dir / JSON_NAME).read_text())
    return d["meta"], [StepResult.from_dict(s) for s in d["steps"]]


class Recorder:
    """Collects a step's tables and summary and rewrites its JSON file after every change, so a
    step stopped at its time box still leaves what it measured."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.data: dict[str, Any] = {}
        self.status, self.summary = "timeout", "stopped before its first result"
        self.t0 = time.perf_counter()
        self.flush()

    def row(self, table: str, **row: Any) -> None:
        self.tables.setdefault(table, []).append(row)
        self.flush()

    def finish(self, status: str, summary: str, **data: Any) -> None:
        self.status, self.summary = status, summary
        self.data.update(data)
        self.flush()

    def flush(self) -> None:
        self.path.write_text(json.dumps(dict(name=self.name, status=self.status, summary=self.summary,
                                             seconds=time.perf_counter() - self.t0, tables=self.tables,
                                             data=self.data), default=str))
