"""hetsp's planners: per-batch plans that scatter sequences over groups of ranks.

Never imports torch. The runtime reaches this package only through
`get_planner(name, planner_cfg, cluster_cfg, model_cfg)` and
`Planner.plan(lengths, num_ranks) -> hetsp.plan.Plan`; everything heavy
(PuLP, the cost models) is imported lazily, so ``import solver`` is cheap.

Planners: ``static`` (one group size, best-fit packing), ``random`` (any
valid plan, for tests), ``batch_adaptive`` (the best single group size per
batch), ``greedy`` (makespan-target packing, per-micro-batch repacking and
local search), ``milp`` (greedy, then integer programs in PuLP, HiGHS by
default). The best single static size over many batches is
`solver.compare.best_static_total`. CLI: ``python -m solver`` / ``hetsp-plan``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from hetsp.config import ClusterConfig, ModelConfig, PlannerConfig

    from .base import Planner

# name -> "module:Class", imported on first use.
_PLANNERS = {
    "static": "solver.static:StaticPlanner",
    "random": "solver.random_planner:RandomPlanner",
    "greedy": "solver.greedy:GreedyPlanner",
    "batch_adaptive": "solver.baselines:BatchAdaptivePlanner",
    "milp": "solver.milp:MilpPlanner",
}


def planner_names() -> list[str]:
    """Names accepted by `get_planner`."""
    return sorted(_PLANNERS)


def get_planner(
    name: str,
    planner: "PlannerConfig",
    cluster: "ClusterConfig",
    model: "ModelConfig | None" = None,
) -> "Planner":
    """Build the planner called `name` from the config sections it reads.

    Raises ValueError for an unknown name (listing the known ones).
    """
    import importlib

    if name not in _PLANNERS:
        raise ValueError(f"unknown planner {name!r}; choose one of {planner_names()}")
    module_name, cls_name = _PLANNERS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(planner, cluster, model)


__all__ = ["get_planner", "planner_names"]
