"""One typed config tree, loaded from TOML, with command-line overrides.

No torch and no PuLP here (the solver reads `PlannerConfig`/`ClusterConfig`).
Every section is a dataclass; loading checks every key and type and raises
`ConfigError` naming the file and the key path (``model.hidden_size``).
Overrides use the same path syntax: ``--set train.steps=20``; the value is
parsed as TOML when it can be (numbers, booleans, lists, quoted strings)
and taken as a plain string otherwise.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


# Fixed choices, checked at load (a new choice is one more name in its Literal).
PlannerName = Literal["static", "random", "greedy", "batch_adaptive", "milp"]
CostModelName = Literal["ring", "profile", "flexsp"]
AttentionKernelName = Literal["auto", "torch_cpu", "flash_attn", "triton", "torch_flash", "reference"]
ObjectiveName = Literal["lm", "copg", "sequencematch"]


@dataclass
class RunConfig:
    name: str = "default"
    output_dir: str = "runs"
    seed: int = 0
    resume: bool = False  # continue from the newest checkpoint in the run folder
    dist_timeout_s: float = 600.0  # a collective waiting longer than this fails the job
    # The launcher stops the job, naming the rank, when a rank's heartbeat is this old
    # (a stopped, frozen or swapped-out process); well under dist_timeout_s.
    heartbeat_timeout_s: float = 60.0
    # SIGTERM (preemption): ranks checkpoint at the end of the current step; the launcher
    # waits this long for them before killing them.
    stop_grace_s: float = 120.0
    # Where step metrics go: "jsonl" (metrics.jsonl, always) and optionally "tensorboard"
    # (the same scalars under RUN/tensorboard/; needs the tensorboard package).
    report_to: list[Literal["jsonl", "tensorboard"]] = field(default_factory=lambda: ["jsonl"])


@dataclass
class ModelConfig:
    # "llama" (a stock transformers LlamaForCausalLM), "hybrid" (models.HybridForCausalLM),
    # or any other name registered in hetsp.model_registry.
    family: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    vocab_size: int = 0  # 0: take it from the tokenizer
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    # Family-specific options passed to the model's config (e.g. layer_pattern for hybrid).
    extra: dict[str, Any] = field(default_factory=dict)
    # A local Hugging Face model folder to start from (config.json + safetensors); the family and
    # the shape come from its config.json (hetsp.loading). "" starts from random weights.
    init_from: str = ""
    # RoPE scaling that overrides the checkpoint's, e.g. {rope_type = "linear", factor = 4.0}.
    rope_scaling: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    # "stdlib": the Python standard library's source files (embedded default corpus);
    # a local file or folder (text/json/jsonl/parquet), or a hub dataset name.
    dataset: str = "stdlib"
    dataset_config: str = ""
    split: str = "train"
    text_field: str = "text"
    # "bytes": built-in byte-level tokenizer; otherwise a local transformers tokenizer folder.
    tokenizer: str = "bytes"
    max_seq_len: int = 2048
    long_policy: Literal["split", "drop"] = "split"
    tokens_per_batch: int = 16384
    validation_fraction: float = 0.02
    num_proc: int = 1
    add_bos: bool = False  # start every document with the tokenizer's bos token (eos always ends it)
    max_documents: int = 0  # > 0: keep only the first N documents (in source order; stdlib: sorted paths)
    validation_seed: int = 0  # picks the held-out documents; independent of run.seed on purpose
    # Local .txt/.md files: one document per "document" (file), "paragraph" or "line".
    text_sample_by: Literal["document", "paragraph", "line"] = "document"
    # "text": documents (continued pretraining); "prompt_completion" and "messages": fine-tuning
    # examples where only completion / assistant tokens carry loss (hetsp.data.finetune).
    format: Literal["text", "prompt_completion", "messages"] = "text"
    # An example longer than max_seq_len: "error", "drop" (counted), or "keep_end" (cut the start of
    # the prompt so the example fits; an example whose completion alone does not fit is dropped).
    prompt_policy: Literal["error", "drop", "keep_end"] = "error"


@dataclass
class ClusterConfig:
    ranks_per_node: int = 0  # 0: all ranks on one node
    memory_per_rank_gb: float = 0.0  # 0: unknown (memory constraints use tokens_per_rank)
    tokens_per_rank: int = 4096  # activation budget of one rank, in tokens
    peak_tflops: float = 0.0  # 0: unknown (looked up from the device when possible)
    intra_node_gbps: float = 100.0
    inter_node_gbps: float = 12.5
    # Ring cost model: the fraction of peak FLOP/s that kernels reach, and the latency of one
    # point-to-point message (per ring step).
    compute_efficiency: float = 0.5
    link_latency_us: float = 10.0


@dataclass
class PlannerConfig:
    name: PlannerName = "static"
    group_size: int = 1  # static planner: the one group size
    cost_model: CostModelName = "ring"
    time_limit_s: float = 1.0
    allowed_group_sizes: list[int] = field(default_factory=list)  # empty: 1..world
    seed: int = 0
    # A sequence longer than the largest group can hold: "error" (name it) or "drop" (plan the
    # rest; the Plan records which input sequences it trains: Plan.source_index, Plan.dropped).
    long_policy: Literal["error", "drop"] = "error"
    flexsp_model: Literal["7b", "13b", "30b"] = "7b"  # cost_model = "flexsp": which published model ("7b", "13b", "30b")
    profile_path: str = ""  # cost_model = "profile": the measured JSON table
    # Planner-specific options, checked against the planner's own table (hetsp.checks).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttentionConfig:
    kernel: AttentionKernelName = "auto"
    # Triton kernel tiles (query rows, key rows per program), powers of two >= 16; 0 = the
    # kernel's default (64 x 64 on CUDA). bench/gpu_check.sh reports the fastest on a GPU.
    triton_block_m: int = 0
    triton_block_n: int = 0


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    zero_stage: int = 1
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    objective: ObjectiveName = "lm"
    eval_every: int = 25
    eval_batches: int = 2
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1  # progress line every N steps (metrics.jsonl gets every step)
    # Stop this run after this many steps (0: run to `steps`); the schedule still spans
    # `steps`, and a checkpoint is written at the stop so `--resume` continues exactly.
    stop_after: int = 0


@dataclass
class LoraConfig:
    r: int = 0  # 0: no LoRA (every parameter trains)
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # The typed section of the objective `train.objective` names (hetsp.objectives.config);
    # filled in by `config_from_dict`.
    objective: Any = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {path} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None) and value is None:
                return None
            try:
                return _coerce(value, a, path, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {path} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {path} must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {path} must be a table, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {path} must be a table, got {type(value).__name__} {value!r}")
        return _build(tp, value, path, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {path} must be a boolean, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {path} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {path} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {path} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"config field {path}: unsupported annotation {tp!r}")


def _build(cls: type, data: dict[str, Any], path: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key_path!r} (known keys here: {sorted(names)})")
        kwargs[key] = _coerce(value, hints[key], key_path, where)
    obj = cls(**kwargs)
    obj.__dict__["_explicit_keys"] = frozenset(kwargs)  # read by explicit_keys()
    return obj


def explicit_keys(section: Any) -> frozenset[str]:
    """The keys of a config section that its file or overrides set (not defaults)."""
    return section.__dict__.get("_explicit_keys", frozenset())


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key name")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge ``a.b.c=value`` overrides into a raw config dict (checked later by `_build`)."""
    for text in overrides:
        parts, value = _parse_override(text)
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any], where: str = "<dict>") -> Config:
    cfg = _build(Config, data, "", where)
    cfg.objective = _objective_section(cfg.train.objective, cfg.objective, where)
    return cfg


def _objective_section(name: str, raw: Any, where: str) -> Any:
    """The `[objective]` table typed by the dataclass of objective `name` (unknown keys rejected)."""
    from hetsp.objectives.config import OBJECTIVE_CONFIGS

    if name not in OBJECTIVE_CONFIGS:
        raise ConfigError(f"{where}: train.objective {name!r} is unknown; known: {sorted(OBJECTIVE_CONFIGS)}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: objective must be a table, got {type(raw).__name__} {raw!r}")
    try:
        section = _build(OBJECTIVE_CONFIGS[name], raw, "objective", where)
    except ConfigError:
        raise
    except ValueError as e:  # a section that checks its values when built (SequenceMatchConfig)
        raise ConfigError(f"{where}: {e}") from None
    check = getattr(section, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return section


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config (None: all defaults) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    if overrides:
        apply_overrides(data, overrides)
        where += " (with --set overrides)"
    return config_from_dict(data, where)


def config_to_toml(cfg: Config) -> str:
    """The whole tree as TOML text (written into every run folder)."""
    lines: list[str] = []
    for sec_name, sec in cfg.to_dict().items():
        if sec is None:  # a section not typed yet (`objective` of a Config built in code)
            continue
        lines.append(f"[{sec_name}]")
        nested = []
        for k, v in sec.items():
            if isinstance(v, dict):
                nested.append((k, v))
            else:
                lines.append(f"{k} = {_toml_value(v)}")
        for k, v in nested:
            lines.append(f"[{sec_name}.{k}]")
            for kk, vv in v.items():
                lines.append(f"{kk} = {_toml_value(vv)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")
