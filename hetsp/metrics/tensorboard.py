"""TensorBoard event files of a run (``run.report_to = ["jsonl", "tensorboard"]``).

metrics.jsonl stays the record of a run; this writer adds the same scalars to
``RUN/tensorboard/`` so that a run can be watched with ``tensorboard --logdir RUN``.
Every number of a metrics.jsonl line is one scalar, tagged ``KIND/KEY`` (``train/loss``,
``eval/val_loss``) at the line's step; a table such as ``group_sizes`` becomes one scalar
per entry (``train/group_sizes/2``). Needs the optional ``tensorboard`` package
(``pip install 'hetsp[tensorboard]'``); without it `TensorBoardWriter` refuses to start.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterator

REPORTERS = ("jsonl", "tensorboard")
SKIPPED = {"kind", "step", "time"}  # the record's identity, not a measurement


def check_report_to(report_to: list[str]) -> None:
    """ValueError unless `report_to` lists known reporters, includes "jsonl", and the packages they need exist."""
    unknown = [r for r in report_to if r not in REPORTERS]
    if unknown:
        raise ValueError(f"run.report_to: unknown reporter(s) {unknown}; choose from {list(REPORTERS)}")
    if "jsonl" not in report_to:
        raise ValueError('run.report_to must include "jsonl" (metrics.jsonl is the record every tool reads), '
                         f"got {report_to}")
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        raise ValueError('run.report_to includes "tensorboard" but the tensorboard package is not installed: '
                         "pip install 'hetsp[tensorboard]' (or pip install tensorboard), or remove it from run.report_to")


def scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(tag, value)`` of every number in a metrics.jsonl record (nested tables flattened with "/")."""
    for key, value in record.items():
        if not prefix and key in SKIPPED:
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, bool):
            yield tag, float(value)
        elif isinstance(value, (int, float)):
            yield tag, float(value)
        elif isinstance(value, dict):
            yield from scalars(value, f"{tag}/")


class TensorBoardWriter:
    """Writes each metrics.jsonl record as scalars into ``RUN/tensorboard/``."""

    def __init__(self, run_dir: Path) -> None:
        check_report_to(["jsonl", "tensorboard"])
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def add(self, record: dict[str, Any]) -> None:
        kind, step = record.get("kind", "train"), int(record["step"])
        for tag, value in scalars(record):
            self._writer.add_scalar(f"{kind}/{tag}", value, step, walltime=record.get("time"))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
