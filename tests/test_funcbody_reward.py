"""The embedded function-body reward ranks real standard-library bodies above corrupted ones."""

import ast
import inspect
import json.decoder
import textwrap as textwrap_mod

import pytest

from hetsp.rewards.funcbody import funcbody_reward, reward_parts


def real_functions(limit=12):
    """(prompt, body, params) of top-level stdlib functions with a docstring and parameters."""
    out = []
    for mod in (textwrap_mod, json.decoder, inspect):
        src = inspect.getsource(mod)
        lines = src.splitlines(keepends=True)
        for node in ast.parse(src).body:
            if not isinstance(node, ast.FunctionDef) or not ast.get_docstring(node) or len(node.body) < 3:
                continue
            a = node.args
            params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
            params = [x for x in params if x not in ("self", "cls")]  # the reward does not count these
            if not params:
                continue
            doc_end = node.body[0].end_lineno
            prompt = textwrap_mod.dedent("".join(lines[node.lineno - 1 : doc_end]))
            body = "".join(lines[doc_end : node.end_lineno])
            out.append((prompt, body, params))
            if len(out) >= limit:
                return out
    return out


def corruptions(body, params):
    lines = body.splitlines(keepends=True)
    half = len(body) // 2
    yield "cut mid-line", body[:half] + ")(\n"
    mid = len(lines) // 2
    yield "unbalanced line inserted", "".join(lines[:mid] + ["    foo(]\n"] + lines[mid:])
    renamed = body
    for p in params:
        renamed = renamed.replace(p, "zz_" + p)
    yield "parameters unused", renamed
    yield "brackets dropped", body.replace("(", " ", 3)


FUNCS = real_functions()


def test_found_real_functions():
    assert len(FUNCS) >= 8


@pytest.mark.parametrize("prompt,body,params", FUNCS)
def test_real_body_scores_above_each_corruption(prompt, body, params):
    real = funcbody_reward(prompt, body)
    assert real > 0.9, reward_parts(prompt, body)
    for name, bad in corruptions(body, params):
        if bad == body:
            continue
        assert funcbody_reward(prompt, bad) < real, (name, prompt[:60], reward_parts(prompt, bad))


def test_graded_not_binary():
    prompt = 'def add(a, b):\n    """Return the sum of a and b."""\n'
    scores = [
        funcbody_reward(prompt, ""),
        funcbody_reward(prompt, "    x = (\n"),
        funcbody_reward(prompt, "    x = 1\n    print(x\n"),
        funcbody_reward(prompt, "    return a\n"),
        funcbody_reward(prompt, "    return a + b\n"),
    ]
    assert scores == sorted(scores) and scores[0] == 0.0 and scores[-1] == 1.0
    assert len(set(scores)) == len(scores)
