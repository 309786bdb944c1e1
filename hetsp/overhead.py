"""What a rank process holds besides model states and activations: libraries, the corpus,
DeepSpeed's buffers. Added to the dry run's per-rank estimate and checked by the launcher
against the host's memory before it starts ranks.

- Libraries: the resident size of a fresh interpreter that has imported what a rank imports
  (torch, DeepSpeed, transformers, datasets, hetsp's runtime, the model zoo). Measured once
  in a child process (tens of seconds on a loaded machine) and cached per library versions
  under ``$XDG_CACHE_HOME/hetsp/`` (``~/.cache/hetsp/``).
- Data: every rank tokenizes and keeps the whole corpus (batches are derived from (seed,
  step) on every rank). Per token of text it keeps the token ids twice as uint16 (the
  tokenized corpus and the cut sequences, 4 bytes), the source text in the dataset's Arrow
  table (about 1 byte per byte of text) and offsets; measured on the stdlib corpus
  (31.5M tokens): 255 MiB resident after building, 8.5 bytes per token, so
  `DATA_BYTES_PER_TOKEN` = 8.5. The corpus size is the text's size in bytes (the byte
  tokenizer's token count, an upper bound for subword tokenizers); a hub dataset's size is
  unknown before download and counts as 0 (said in the note).
- DeepSpeed: ZeRO-1/2 flatten gradients into reduce buckets of at most `REDUCE_BUCKET`
  elements (its default), in the gradient dtype, and keep the flat fp32 partition; ZeRO-3
  also prefetches parameters in buckets of `PREFETCH_BUCKET` elements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from hetsp.config import Config, DataConfig

GIB = 1024**3
DATA_BYTES_PER_TOKEN = 8.5
REDUCE_BUCKET = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default (elements)
PREFETCH_BUCKET = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size default (elements)
RANK_IMPORTS = ("torch", "deepspeed", "transformers", "datasets", "hetsp.train", "hetsp.attention", "hetsp.data",
                "hetsp.engine", "hetsp.executor", "hetsp.model_registry", "hetsp.ssm_parallel", "hetsp.planning",
                "hetsp.metrics", "hetsp.objectives", "models", "solver")
_VERSIONED = ("torch", "deepspeed", "transformers", "datasets", "triton")


def _versions_key() -> str:
    parts = [f"python-{sys.version_info.major}.{sys.version_info.minor}"]
    for name in _VERSIONED:
        try:
            parts.append(f"{name}-{metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name}-none")
    return "_".join(parts)


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "hetsp" / "library_rss.json"


def cached_library_bytes() -> int | None:
    """The cached measurement for these library versions, or None."""
    try:
        table = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return None
    value = table.get(_versions_key()) if isinstance(table, dict) else None
    return int(value) if isinstance(value, (int, float)) else None


def measure_library_bytes() -> int:
    """Resident bytes of a fresh interpreter after a rank's imports (measured now, then cached)."""
    code = (
        f"import {', '.join(RANK_IMPORTS)}\n"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])\n"
    )
    env = dict(os.environ, HETSP_LOG_LEVEL="ERROR")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=str(Path(__file__).resolve().parents[1]))
    if out.returncode != 0:
        raise RuntimeError(f"could not measure the libraries' memory: {out.stderr.strip().splitlines()[-1:]}")
    value = int(out.stdout.strip().splitlines()[-1]) * 1024
    path = _cache_file()
    try:
        table = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        table = {}
    table[_versions_key()] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return value


def library_bytes() -> int:
    cached = cached_library_bytes()
    return cached if cached is not None else measure_library_bytes()


def corpus_bytes(data: DataConfig) -> tuple[int, str]:
    """(bytes of text the corpus holds, where the figure comes from), without loading it."""
    if data.dataset == "stdlib":
        from hetsp.data.sources import stdlib_files

        root, rel = stdlib_files(data.max_documents)
        return sum((root / p).stat().st_size for p in rel), "stdlib source files"
    path = Path(data.dataset).expanduser()
    if path.is_file():
        return path.stat().st_size, "file size"
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()), "folder size"
    return 0, "hub dataset: size unknown before download, not counted"


def deepspeed_buffer_bytes(num_params: int, zero_stage: int, bf16: bool) -> int:
    """DeepSpeed's flat buffers for `num_params` parameters (see the module docstring)."""
    grad_bytes = 2 if bf16 else 4
    buffers = min(REDUCE_BUCKET, num_params) * grad_bytes
    if zero_stage >= 3:
        buffers += min(PREFETCH_BUCKET, num_params) * grad_bytes
    return buffers


@dataclass(frozen=True)
class ProcessOverhead:
    libraries: int
    data: int
    deepspeed: int
    data_note: str

    @property
    def total(self) -> int:
        return self.libraries + self.data + self.deepspeed

    def describe(self) -> str:
        return (f"libraries {self.libraries / GIB:.2f} GiB + data {self.data / GIB:.2f} GiB ({self.data_note}) + "
                f"DeepSpeed buffers {self.deepspeed / GIB:.2f} GiB = {self.total / GIB:.2f} GiB")


def process_overhead(cfg: Config, num_params: int = 0, bf16: bool = False,
                     libraries: int | None = None) -> ProcessOverhead:
    """What one rank holds besides model states and activations (`num_params` 0: not known yet)."""
    size, note = corpus_bytes(cfg.data)
    return ProcessOverhead(
        libraries=library_bytes() if libraries is None else libraries,
        data=int(size * DATA_BYTES_PER_TOKEN),
        deepspeed=deepspeed_buffer_bytes(num_params, cfg.train.zero_stage, bf16),
        data_note=f"{size / 1e6:.1f} M bytes of text, {note}",
    )


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of this host's memory, from /proc/meminfo."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) * 1024
    return fields["MemTotal"], fields.get("MemAvailable", fields["MemFree"])


def host_problems(ranks_on_host: int, per_rank_bytes: int, available_bytes: int, cores: int,
                  ranks_per_core: int = 4) -> list[str]:
    """Why `ranks_on_host` ranks should not start here (empty: they fit)."""
    problems = []
    need = ranks_on_host * per_rank_bytes
    if need > available_bytes:
        problems.append(f"{ranks_on_host} ranks need about {need / GIB:.1f} GiB ({per_rank_bytes / GIB:.2f} GiB each "
                        f"before activations and model states) but this host has {available_bytes / GIB:.1f} GiB "
                        "available")
    if ranks_on_host > ranks_per_core * cores:
        problems.append(f"{ranks_on_host} ranks on {cores} core(s) is more than {ranks_per_core} per core")
    return problems
