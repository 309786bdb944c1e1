"""The function-body task: from the standard library's sources (the main job's corpus), with
Python's own `ast`, examples whose prompt is a function's signature and docstring and whose
completion is its body.

Held-out split by file, the same files the main job holds out: the main job splits the
non-empty stdlib files with `split_documents(n, data.validation_fraction, data.validation_seed)`,
and so does `split_files`, so with the same two settings no validation prompt comes from a file
the pretrained model was trained on.
"""

from __future__ import annotations

import ast
import logging
from typing import Any

from ...config import DataConfig
from ..corpus import split_documents
from ..sources import stdlib_files

log = logging.getLogger("hetsp.data")

DATASET_NAME = "funcbody"


def _dedent(line: str, indent: str) -> str:
    return line[len(indent):] if line.startswith(indent) else line.lstrip(" \t") if not line.strip() else line


def function_examples(source: str) -> list[dict[str, str]]:
    """One {prompt, completion, name} per function (methods and nested ones included) with a docstring
    and a body after it. The prompt runs from the first decorator (or ``def``) through the docstring's
    last line, the completion from the next line to the function's end; both are dedented to the
    ``def`` line and end with a newline. A source that does not parse gives no examples."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = node.body[0]
        if ast.get_docstring(node, clean=False) is None or node.body[1].lineno <= doc.end_lineno:
            continue
        if doc.lineno <= node.lineno:  # docstring on the def line: no clean cut between prompt and body
            continue
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        def_line = lines[start]
        indent = def_line[: len(def_line) - len(def_line.lstrip(" \t"))]
        prompt = "".join(_dedent(x, indent) for x in lines[start : doc.end_lineno])
        completion = "".join(_dedent(x, indent) for x in lines[doc.end_lineno : node.end_lineno])
        if not completion.strip():
            continue
        if not completion.endswith("\n"):
            completion += "\n"
        out.append((start, {"prompt": prompt, "completion": completion, "name": node.name}))
    return [e for _, e in sorted(out, key=lambda x: x[0])]


def split_files(data: DataConfig) -> tuple[list[str], list[str], Any]:
    """(train paths, validation paths, stdlib root): the main job's document split of the stdlib files."""
    root, rel = stdlib_files(data.max_documents)
    texts = [(root / p).read_bytes().decode("utf-8", errors="replace") for p in rel]
    nonempty = [i for i, t in enumerate(texts) if t]
    train_pos, val_pos = split_documents(len(nonempty), data.validation_fraction, data.validation_seed)
    return [rel[nonempty[i]] for i in train_pos], [rel[nonempty[i]] for i in val_pos], root


def load_funcbody(data: DataConfig) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train examples, validation examples), each {prompt, completion, name, path}, split by file."""
    train_paths, val_paths, root = split_files(data)

    def examples(paths: list[str]) -> list[dict[str, str]]:
        rows = []
        for p in paths:
            text = (root / p).read_bytes().decode("utf-8", errors="replace")
            rows += [dict(e, path=p) for e in function_examples(text)]
        return rows

    train, val = examples(train_paths), examples(val_paths)
    log.info("task funcbody: %d train examples from %d files, %d held-out examples from %d files",
             len(train), len(train_paths), len(val), len(val_paths))
    return train, val
