"""Where documents come from: the embedded stdlib corpus, local files, or a hub dataset.

Every source returns a `datasets.Dataset` with one row per document and a string
column named by ``data.text_field``; a wrong path or field is a ValueError that
says what exists.
"""

from __future__ import annotations

import logging
import os
import socket
import sysconfig
from pathlib import Path
from urllib.parse import urlparse

from ..config import DataConfig

log = logging.getLogger("hetsp.data")

# File extension -> `datasets` packaged builder.
BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_EXCLUDED_DIRS = ("site-packages", "dist-packages")


def stdlib_files(max_documents: int = 0) -> tuple[Path, list[str]]:
    """The standard library's *.py files as paths relative to its root, sorted.

    Skips anything under site-packages or dist-packages. ``max_documents > 0`` keeps the
    first that many (in sorted order).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    rel: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                rel.append(Path(dirpath, f).relative_to(root).as_posix())
    rel.sort()
    if max_documents > 0:
        rel = rel[:max_documents]
    return root, rel


def load_stdlib(data: DataConfig):
    """One document per stdlib source file (text decoded as UTF-8, bad bytes replaced)."""
    from datasets import Dataset

    root, rel = stdlib_files(data.max_documents)
    if not rel:
        raise ValueError(f"data.dataset = 'stdlib': no *.py files found under {root}")
    texts = [(root / p).read_bytes().decode("utf-8", errors="replace") for p in rel]
    log.info("stdlib corpus: %d files under %s", len(rel), root)
    return Dataset.from_dict({data.text_field: texts, "path": rel})


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(builder name, sorted data files) for a file or a folder of files of one kind."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
        if not files:
            raise ValueError(
                f"data.dataset = {str(path)!r}: folder has no files with a supported extension "
                f"({', '.join(sorted(BUILDERS))})"
            )
    kinds = {BUILDERS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise ValueError(
            f"data.dataset = {str(path)!r}: unsupported file extension {path.suffix!r}; "
            f"use one of {', '.join(sorted(BUILDERS))}"
        )
    if len(kinds) > 1:
        raise ValueError(
            f"data.dataset = {str(path)!r}: the folder mixes file kinds {sorted(kinds)}; keep one kind per folder"
        )
    if all(p.stat().st_size == 0 for p in files):
        raise ValueError(f"data.dataset = {str(path)!r}: the corpus is empty (every file has 0 bytes)")
    return kinds.pop(), [str(p) for p in files]


def _has_text(path: str, chunk: int = 1 << 20) -> bool:
    """Whether a text file holds anything but whitespace (read until the first such byte)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


def load_local(data: DataConfig, path: Path):
    from datasets import load_dataset

    builder, files = _local_files(path)
    if builder == "text" and not any(_has_text(f) for f in files):
        raise ValueError(f"data.dataset = {str(path)!r}: the corpus has no text (only empty lines or whitespace)")
    kwargs = {"sample_by": data.text_sample_by} if builder == "text" else {}
    try:
        ds = load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as e:
        raise ValueError(
            f"data.dataset = {str(path)!r}: could not read it as {builder} ({type(e).__name__}: {e})"
        ) from e
    log.info("local %s dataset: %d files, %d rows from %s", builder, len(files), len(ds), path)
    return ds


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~"))
        or Path(name).suffix.lower() in BUILDERS
        or os.sep in name and Path(name.split(os.sep)[0]).exists()
    )


def _hub_unreachable() -> str:
    """Why the hub cannot be used right now ('' if it can), checked in seconds, not minutes of retries."""
    import datasets.config

    if datasets.config.HF_HUB_OFFLINE or getattr(datasets.config, "HF_DATASETS_OFFLINE", False):
        return "hub access is disabled (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as e:
        return f"the hub at {endpoint} cannot be reached ({e})"
    return ""


def load_hub(data: DataConfig):
    from datasets import load_dataset

    reason = _hub_unreachable()
    if reason:
        raise ValueError(
            f"data.dataset = {data.dataset!r} is not a local path (no such file or folder: "
            f"{Path(data.dataset).resolve()}), and {reason}. Use 'stdlib' or a local file or folder."
        )
    try:
        ds = load_dataset(data.dataset, data.dataset_config or None, split=data.split)
    except Exception as e:
        raise ValueError(
            f"data.dataset = {data.dataset!r} is not a local path (no such file or folder: "
            f"{Path(data.dataset).resolve()}), and loading it from the hub failed "
            f"({type(e).__name__}: {e})"
        ) from e
    log.info("hub dataset %s (split %s): %d rows", data.dataset, data.split, len(ds))
    return ds


def load_source(data: DataConfig):
    """The configured source as a `datasets.Dataset`, its fields unchecked."""
    if data.dataset == "stdlib":
        ds = load_stdlib(data)
    else:
        path = Path(data.dataset).expanduser()
        if path.exists():
            ds = load_local(data, path)
        elif _looks_like_path(data.dataset):
            raise ValueError(
                f"data.dataset = {data.dataset!r}: no such file or folder ({path.resolve()}). "
                "Give an existing text/json/jsonl/parquet file or folder, 'stdlib', or a hub dataset name."
            )
        else:
            ds = load_hub(data)
    return ds


def load_documents(data: DataConfig):
    """The configured source as a `datasets.Dataset` with the string column ``data.text_field``."""
    ds = load_source(data)
    if data.text_field not in ds.column_names:
        raise ValueError(
            f"data.text_field = {data.text_field!r} is not a field of {data.dataset!r}; "
            f"available fields: {ds.column_names}. Set data.text_field to one of them."
        )
    feature = ds.features[data.text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(
            f"data.text_field = {data.text_field!r} of {data.dataset!r} holds {feature}, not text; "
            f"available fields: {ds.column_names}"
        )
    if data.max_documents > 0 and len(ds) > data.max_documents:
        ds = ds.select(range(data.max_documents))
    return ds
