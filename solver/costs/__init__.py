"""Cost models: `ring` (hetsp's ring attention, analytic), `profile` (measured table), `flexsp` (published).

`build_cost_model(planner_cfg, cluster_cfg, model_cfg, num_ranks)` picks one
by ``planner.cost_model``; see each module for its parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import CostModel

if TYPE_CHECKING:  # pragma: no cover
    from hetsp.config import ClusterConfig, ModelConfig, PlannerConfig

COST_MODELS = ("ring", "profile", "flexsp")


def build_cost_model(
    planner: "PlannerConfig", cluster: "ClusterConfig", model: "ModelConfig | None", num_ranks: int
) -> CostModel:
    """The cost model named by ``planner.cost_model`` for a world of `num_ranks`.

    ``flexsp`` reads ``planner.flexsp_model`` ("7b", "13b", "30b") and
    ``cluster.memory_per_rank_gb`` (30 when 0). ``profile`` reads
    ``planner.profile_path`` (and ``planner.options["extrapolate"]``, default false: refuse lengths
and group sizes beyond the measured ones). ``ring`` needs `model` and the cluster's hardware, and reads
    ``planner.options`` "zero_stage" (default 1: the collectives paid per micro-batch and the
    model states), "dtype" (default "bf16") and "activation_checkpointing" (default false).
    """
    name = planner.cost_model
    if name == "flexsp":
        from .flexsp import FlexSPCostModel

        mem = cluster.memory_per_rank_gb or 30.0
        return FlexSPCostModel(planner.flexsp_model, num_ranks, mem)
    if name == "profile":
        from .profile import ProfileCostModel

        if not planner.profile_path:
            raise ValueError("planner.cost_model = 'profile' needs planner.profile_path (a JSON profile)")
        return ProfileCostModel.load(planner.profile_path, cluster, bool(planner.options.get("extrapolate", False)))
    if name == "ring":
        from .ring import RingCostModel

        if model is None:
            raise ValueError("the ring cost model needs the model's shape (pass the model config)")
        opts = planner.options
        return RingCostModel.from_configs(
            model, cluster, num_ranks, int(opts.get("zero_stage", 1)), str(opts.get("dtype", "bf16")),
            bool(opts.get("activation_checkpointing", False)),
        )
    raise ValueError(f"unknown cost model {name!r}; choose one of {list(COST_MODELS)}")


__all__ = ["CostModel", "build_cost_model", "COST_MODELS"]
