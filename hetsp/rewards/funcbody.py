"""A graded reward for Python function bodies, with the standard library only (`ast`, `tokenize`).

The prompt is a function's source up to and including its docstring (the
header ``def name(params):`` and the docstring); the completion is the body.
The reward is in [0, 1], the weighted sum of four parts:

- 0.3 tokenizes: the fraction of the body's characters before the first
  `tokenize` error (1 when the whole body tokenizes);
- 0.3 parses: the fraction of the body's non-blank lines in the longest
  prefix of lines that, after the prompt, parses as Python;
- 0.2 uses the parameters: the fraction of the function's parameters (self
  and cls excluded) read somewhere in that parsed prefix (1 when it has none);
- 0.2 returns as documented: when the docstring says the function returns
  (the word "return" or "returns"), 1 if the parsed prefix has a ``return``
  with a value of its own (not in a nested function), else 0; when it does
  not say so, 1.

An empty body scores 0. Partial credit is the point: a body that parses
halfway, or parses but ignores its arguments, sits between a real body and noise.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize

WEIGHTS = {"tokenizes": 0.3, "parses": 0.3, "uses_params": 0.2, "returns": 0.2}
_RETURNS = re.compile(r"\breturns?\b", re.IGNORECASE)


def _function(tree: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node
    return None


def _own_nodes(stmts: list[ast.stmt]):
    """Every node of these statements, not descending into nested functions, lambdas or classes
    (their returns are not the function's)."""
    todo = list(stmts)
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                todo.append(child)


def _tokenizes_fraction(text: str) -> float:
    last_ok = 0
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            row, col = tok.end
            if 1 <= row <= len(lines):
                last_ok = max(last_ok, offsets[row - 1] + col)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return last_ok / max(1, len(text))
    return 1.0


def _parsed_prefix(prompt: str, body_lines: list[str]) -> tuple[ast.AST | None, int]:
    """The AST of prompt + the longest parseable prefix of body lines, and its non-blank line count."""
    for n in range(len(body_lines), 0, -1):
        try:
            tree = ast.parse(prompt + "".join(body_lines[:n]))
        except (SyntaxError, ValueError):
            continue
        return tree, sum(1 for line in body_lines[:n] if line.strip())
    return None, 0


def reward_parts(prompt: str, completion: str) -> dict[str, float]:
    """The four parts, each in [0, 1] (see the module docstring)."""
    if not completion.strip():
        return {k: 0.0 for k in WEIGHTS}
    if not prompt.endswith("\n"):
        prompt += "\n"
    body_lines = completion.splitlines(keepends=True)
    if body_lines and not body_lines[-1].endswith("\n"):
        body_lines[-1] += "\n"
    nonblank = sum(1 for line in body_lines if line.strip())
    tree, parsed = _parsed_prefix(prompt, body_lines)
    parts = {"tokenizes": _tokenizes_fraction("".join(body_lines)), "parses": parsed / max(1, nonblank)}
    header = _function(tree) if tree is not None else None
    if header is None:
        try:
            header = _function(ast.parse(prompt + " " * 4 + "pass\n"))
        except SyntaxError:
            header = None
    params = []
    doc = ""
    if header is not None:
        a = header.args
        params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
        params += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
        doc = ast.get_docstring(header) or ""
    body_nodes = header.body if (tree is not None and header is not None) else []
    reads = {n.id for stmt in body_nodes for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    parts["uses_params"] = sum(p in reads for p in params) / len(params) if params else 1.0
    if _RETURNS.search(doc):
        has_return = any(isinstance(n, ast.Return) and n.value is not None for n in _own_nodes(body_nodes))
        parts["returns"] = 1.0 if has_return else 0.0
    else:
        parts["returns"] = 1.0
    return parts


def funcbody_reward(prompt: str, completion: str) -> float:
    """The graded reward in [0, 1] (weights in `WEIGHTS`)."""
    parts = reward_parts(prompt, completion)
    return sum(WEIGHTS[k] * v for k, v in parts.items())
