"""Every check of a config that needs no process group, in one function.

`check_run(cfg, world_size)` is called by the launcher before it starts any rank
(a failure prints one line and exits 2) and by every rank before it builds
anything, so the two can never disagree. No torch import here: the launcher's
checks take a fraction of a second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hetsp.config import Config, ConfigError, _coerce


# ----------------------------------------------------------------------------- planner.options


# The option tables only type-check keys; each planner keeps its own defaults.
@dataclass
class _CostModelOptions:
    zero_stage: int = 1  # set from train.zero_stage by the runtime


@dataclass
class StaticOptions(_CostModelOptions):
    budget: Literal["tokens", "cost_model"] = "tokens"


@dataclass
class RandomOptions(_CostModelOptions):
    pass


@dataclass
class _CostedOptions(_CostModelOptions):
    max_degrees: int = 40


@dataclass
class GreedyOptions(_CostedOptions):
    heuristic_s: float | None = None  # None: a share of planner.time_limit_s


@dataclass
class BatchAdaptiveOptions(_CostedOptions):
    fill: float = 1.0


@dataclass
class MilpOptions(_CostedOptions):
    heuristic_s: float | None = None
    exact_max_distinct: int = 24
    num_buckets: int = 16
    max_vars_per_s: float = 3000.0
    backend: Literal["highs", "cbc"] = "highs"


# planner.name -> the options it reads (one line per planner).
PLANNER_OPTIONS: dict[str, type] = {
    "static": StaticOptions,
    "random": RandomOptions,
    "greedy": GreedyOptions,
    "batch_adaptive": BatchAdaptiveOptions,
    "milp": MilpOptions,
}


def check_planner_options(cfg: Config, where: str = "planner.options") -> None:
    """Every key of planner.options is one the chosen planner reads, with the right type."""
    schema = PLANNER_OPTIONS.get(cfg.planner.name)
    if schema is None:
        raise ConfigError(f"planner.name = {cfg.planner.name!r} has no options table in hetsp.checks")
    names = {f.name for f in dataclasses.fields(schema)}
    for key in cfg.planner.options:
        if key not in names:
            raise ConfigError(f"planner.options.{key} is not an option of planner {cfg.planner.name!r} "
                              f"(its options: {sorted(names)})")
    _coerce(dict(cfg.planner.options), schema, "planner.options", where)


# ----------------------------------------------------------------------------- values


def _at_least(value: float, low: float, key: str, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        raise ConfigError(f"{key} = {value}: must be {'>' if strict else '>='} {low}")


def triton_block_ok(block: int) -> bool:
    """A Triton tile size: a power of two of at least 16 (tl.dot and tl.arange limits)."""
    return isinstance(block, int) and block >= 16 and not block & (block - 1)


def check_attention(cfg: Config) -> None:
    a = cfg.attention
    for key in ("triton_block_m", "triton_block_n"):
        b = getattr(a, key)
        if b and not triton_block_ok(b):
            raise ConfigError(f"attention.{key} = {b}: must be 0 (the kernel's default) or a power of two >= 16, e.g. 64")
    if bool(a.triton_block_m) != bool(a.triton_block_n):
        raise ConfigError("attention.triton_block_m and attention.triton_block_n: set both or neither")
    if a.triton_block_m and a.kernel not in ("triton", "auto"):
        raise ConfigError(f"attention.triton_block_m/n are set but attention.kernel = {a.kernel!r}; "
                          "set attention.kernel = \"triton\" or leave the block sizes at 0")


def check_values(cfg: Config) -> None:
    """Numbers that no run can use (a negative step count runs nothing and reports success)."""
    t, r = cfg.train, cfg.run
    for key in ("steps", "warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                "stop_after"):
        _at_least(getattr(t, key), 0, f"train.{key}")
    _at_least(t.log_every, 1, "train.log_every")
    _at_least(cfg.lora.r, 0, "lora.r")
    # a run folder's config.toml writes every field, so compare with the defaults, not with what was written
    changed = [f.name for f in dataclasses.fields(cfg.lora)
               if f.name != "r" and getattr(cfg.lora, f.name) != getattr(type(cfg.lora)(), f.name)]
    if cfg.lora.r == 0 and changed:
        raise ConfigError(f"lora.{changed[0]} is set but lora.r = 0 (no LoRA): set lora.r > 0 to train adapters, "
                          "or remove the [lora] settings")
    if t.zero_stage not in (1, 2, 3):
        raise ConfigError(f"train.zero_stage = {t.zero_stage}: must be 1, 2 or 3")
    _at_least(cfg.planner.time_limit_s, 0, "planner.time_limit_s", strict=True)
    _at_least(cfg.cluster.tokens_per_rank, 1, "cluster.tokens_per_rank")
    _at_least(cfg.cluster.ranks_per_node, 0, "cluster.ranks_per_node")
    for key in ("dist_timeout_s", "heartbeat_timeout_s", "stop_grace_s"):
        _at_least(getattr(r, key), 0, f"run.{key}", strict=True)
    from hetsp.metrics.tensorboard import check_report_to

    try:
        check_report_to(r.report_to)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if r.heartbeat_timeout_s >= r.dist_timeout_s:
        raise ConfigError(f"run.heartbeat_timeout_s = {r.heartbeat_timeout_s} must be below run.dist_timeout_s = "
                          f"{r.dist_timeout_s}, or a hung rank is only seen as a collective's timeout")


def check_files(cfg: Config) -> None:
    """Files the config names that must exist before a rank starts."""
    p = cfg.planner
    if p.cost_model == "profile" and p.name != "random":
        if not p.profile_path:
            raise ConfigError("planner.cost_model = 'profile' needs planner.profile_path (a JSON cost table made "
                              "by hetsp-launch ... --profile OUT.json)")
        if not Path(p.profile_path).is_file():
            raise ConfigError(f"planner.profile_path = {p.profile_path!r}: no such file (relative paths are read "
                              f"from {Path.cwd()})")


def check_planner_fits(cfg: Config, world_size: int, on_gpu: bool | None = None) -> None:
    """The planner can place a sequence of data.max_seq_len tokens on this world (or drops it).
    `on_gpu` (None: whether this process sees CUDA) picks the run dtype of "auto"."""
    from hetsp.planning import make_planner
    from solver.costed import CostedPlanner

    # the vocabulary only scales the ring cost model's logits memory; the tokenizer is not loaded here
    planner = make_planner(cfg, cfg.model.vocab_size or 256, on_gpu)
    if isinstance(planner, CostedPlanner):  # it chooses by time: its cost model must give times
        try:
            planner.cost_model(world_size).seq_time(1, 1)
        except ValueError as e:
            raise ConfigError(f"planner {cfg.planner.name!r} chooses plans by time: {e}") from None
    if cfg.planner.long_policy == "drop":
        return
    limit = planner.max_fit_length(world_size) if planner.uses_memory else None
    if limit is not None and limit < cfg.data.max_seq_len:
        sizes = cfg.planner.allowed_group_sizes or "1..world"
        raise ConfigError(
            f"data.max_seq_len = {cfg.data.max_seq_len} but planner {cfg.planner.name!r} places at most {limit} "
            f"tokens on {world_size} ranks (group sizes {sizes}, cluster.tokens_per_rank = "
            f"{cfg.cluster.tokens_per_rank}): allow larger groups, lower max_seq_len, or set "
            "planner.long_policy = 'drop'"
        )


def check_profile_covers(cfg: Config, world_size: int) -> None:
    """A measured profile (planner.cost_model = "profile") covers every length this configuration can place
    on every allowed group size (up to min(data.max_seq_len, cluster.tokens_per_rank x d)); else re-measure."""
    p = cfg.planner
    if p.cost_model != "profile" or p.name == "random" or p.options.get("extrapolate"):
        return
    from solver.costs.profile import ProfileCostModel

    cm = ProfileCostModel.load(p.profile_path, cfg.cluster)
    degrees = p.allowed_group_sizes or list(range(1, world_size + 1))
    problems = cm.coverage_problems(degrees, cfg.data.max_seq_len)
    if problems:
        raise ConfigError(
            f"planner.profile_path = {p.profile_path!r} does not cover this configuration "
            f"(data.max_seq_len = {cfg.data.max_seq_len}, cluster.tokens_per_rank = {cfg.cluster.tokens_per_rank}): "
            f"{'; '.join(problems)}. Re-measure it for this configuration: hetsp-launch --simulate {world_size} "
            f"CONFIG --profile {p.profile_path} (or set planner.options.extrapolate = true)"
        )


def check_run(cfg: Config, world_size: int, planning: bool = True, on_gpu: bool | None = None) -> None:
    """All checks of `cfg` on `world_size` ranks that need no process group; ValueError (ConfigError) on failure.

    planning=False (``--profile``, which measures the cost table instead of planning): the
    planner's cost table need not exist yet, and its capacity is not checked (nor is torch
    imported). `on_gpu`: whether the ranks compute on GPUs (None: whether this process sees CUDA)."""
    from hetsp.data.module import check_data_config
    from hetsp.preflight import check_world

    check_values(cfg)
    check_attention(cfg)
    check_planner_options(cfg)
    check_data_config(cfg.data)
    check_world(cfg, world_size)
    if planning:
        check_files(cfg)
        check_profile_covers(cfg, world_size)
        check_planner_fits(cfg, world_size, on_gpu)
