"""Where the inspection tool gets lengths: a file, a `datasets` dataset plus tokenizer, or a run folder."""

from __future__ import annotations

import json
from pathlib import Path


def read_lengths_file(path: str | Path) -> list[int]:
    """One positive integer per line; blank lines and ``#`` comments are skipped.

    Raises ValueError naming the file and line of anything else.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"lengths file {p} does not exist")
    out = []
    with p.open() as f:
        for k, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                n = int(text)
            except ValueError:
                raise ValueError(f"{p}, line {k}: {text!r} is not an integer token count") from None
            if n < 1:
                raise ValueError(f"{p}, line {k}: length {n}; every sequence needs at least 1 token")
            out.append(n)
    if not out:
        raise ValueError(f"lengths file {p} holds no lengths")
    return out


def read_run_plans(run_dir: str | Path) -> list[tuple[int, dict]]:
    """``(step, plan dict)`` for every line of ``RUN/plans.jsonl`` (``{"step": int, "plan": Plan.to_dict()}``)."""
    p = Path(run_dir)
    f = p / "plans.jsonl" if p.is_dir() else p
    if not f.is_file():
        raise ValueError(f"{f} does not exist (expected a run folder holding plans.jsonl)")
    out = []
    for k, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step, plan = int(rec["step"]), rec["plan"]
            lengths = [int(x) for x in plan["lengths"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{f}, line {k}: not a plan record ({type(e).__name__}: {e})") from None
        if not lengths or min(lengths) < 1:
            raise ValueError(f"{f}, line {k}: the plan's lengths must be positive and non-empty")
        out.append((step, plan))
    if not out:
        raise ValueError(f"{f} holds no plans")
    return out


def dataset_lengths(
    dataset: str, tokenizer: str, split: str = "train", text_field: str = "text", config: str = "", limit: int = 0
) -> list[int]:
    """Token counts of a `datasets` dataset's texts (the first `limit` rows when > 0).

    `dataset`: a local file or folder (json/jsonl/csv/parquet/txt) or a hub name (must be cached:
    nothing is downloaded when offline). `tokenizer`: "bytes" (UTF-8 bytes, hetsp's built-in
    tokenizer) or a local transformers tokenizer folder.
    """
    import datasets

    path = Path(dataset)
    if path.exists():
        files = [str(x) for x in sorted(path.rglob("*")) if x.is_file()] if path.is_dir() else [str(path)]
        ext = Path(files[0]).suffix.lstrip(".") if files else ""
        kind = {"jsonl": "json", "txt": "text"}.get(ext, ext)
        if kind not in ("json", "csv", "parquet", "text"):
            raise ValueError(f"dataset {dataset}: cannot read files of type {ext!r} (json, jsonl, csv, parquet, txt)")
        ds = datasets.load_dataset(kind, data_files=files, split="train")
    else:
        ds = datasets.load_dataset(dataset, config or None, split=split)
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {dataset} has no column {text_field!r} (columns: {ds.column_names})")
    if limit > 0:
        ds = ds.select(range(min(limit, len(ds))))
    texts = ds[text_field]
    if tokenizer == "bytes":
        lengths = [len(t.encode("utf-8")) for t in texts]
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        lengths = [len(ids) for ids in tok(list(texts))["input_ids"]]
    lengths = [n for n in lengths if n > 0]
    if not lengths:
        raise ValueError(f"dataset {dataset}: no non-empty texts")
    return lengths
