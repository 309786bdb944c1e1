"""Standard metrics of a run in one place: per-step JSONL, plans, progress, summary, FLOPs and MFU, plots.

`MetricsLogger` (logger.py) writes the run folder's metrics.jsonl and plans.jsonl
from rank 0; `flops` counts model FLOPs and looks up device peaks; `plot`
(the ``hetsp-plot`` command) draws a run folder. Importing this package
imports neither torch nor matplotlib.
"""

from hetsp.metrics import flops
from hetsp.metrics.logger import MetricsLogger, format_group_sizes
from hetsp.metrics.summary import format_table, summarize

__all__ = ["MetricsLogger", "flops", "format_group_sizes", "format_table", "summarize"]
