"""Shared output of the benchmark scripts: a table printed, and written to a file when asked."""

from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], out: str = "") -> str:
    """Print `lines` as one text and, when `out` is set, write it there (newline-terminated)."""
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out:
        Path(out).write_text(text)
    return text
