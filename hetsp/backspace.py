"""Stack structure of sequences with a `<bkspc>` action (REFERENCE.md section 4).

Read a sequence left to right with a stack: a token other than `<bkspc>` is pushed,
`<bkspc>` pops the top (never a prompt token). The context of position j is the
stack after token j, followed by token j itself when token j is a `<bkspc>`. Every
token then has a parent (the element before it in its context, -1 for none), the
contexts form a tree, and positions are depths.

Visibility, used by attention: key i is visible to query j iff i is an ancestor of j
or j itself, which is i <= j < pop[i], with pop[i] the index of the `<bkspc>` that
pops i (the sequence length when nothing does) and pop[j] = j + 1 for a `<bkspc>`.

Everything here is plain Python over lists (no torch): O(n) per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class StackStructure:
    """The tree of one sequence (or of several packed ones: `pack_structures`).

    parents: index of each token's parent, -1 at the root of a document.
    depths:  position of each token in its context (RoPE position), 0 at a root.
    pops:    key i is visible to queries [i, pops[i]) of its own document.
    num_pops: how many `<bkspc>` the sequences hold (0: a plain chain, today's path).
    """

    parents: tuple[int, ...]
    depths: tuple[int, ...]
    pops: tuple[int, ...]
    num_pops: int = 0

    def __len__(self) -> int:
        return len(self.parents)

    def context(self, j: int) -> list[int]:
        """ctx(j): the indices whose plain sequence gives the output at j (root first, j last)."""
        out = [j]
        while self.parents[out[-1]] >= 0:
            out.append(self.parents[out[-1]])
        return out[::-1]


def stack_structure(token_ids: Sequence[int], bkspc_id: int, vocab_size: int, prompt_length: int = 0) -> StackStructure:
    """The `StackStructure` of one sequence; validates it (ValueError with the offending index).

    token_ids: the sequence, `<bkspc>` included; bkspc_id: the id of `<bkspc>`, in [0, vocab_size);
    prompt_length: the first prompt_length tokens are the prompt, which no `<bkspc>` may pop.
    """
    if not (0 <= bkspc_id < vocab_size):
        raise ValueError(f"<bkspc> id {bkspc_id} is outside the vocabulary [0, {vocab_size}); add the token to the tokenizer and the model's embedding first")
    n = len(token_ids)
    if not (0 <= prompt_length <= n):
        raise ValueError(f"prompt_length {prompt_length} is outside [0, {n}] for a sequence of {n} tokens")
    parents, depths, pops = [-1] * n, [0] * n, [n] * n
    stack: list[int] = []
    for j, t in enumerate(token_ids):
        if t == bkspc_id:
            if not stack or stack[-1] < prompt_length:
                raise ValueError(
                    f"<bkspc> at position {j} pops " + ("an empty stack" if not stack else f"prompt token {stack[-1]} (prompt length {prompt_length})")
                    + "; a <bkspc> may only delete generated tokens: fix the data preparation"
                )
            pops[stack.pop()] = j
            pops[j] = j + 1
        parents[j] = stack[-1] if stack else -1
        depths[j] = len(stack)
        if t != bkspc_id:
            stack.append(j)
    return StackStructure(tuple(parents), tuple(depths), tuple(pops), sum(t == bkspc_id for t in token_ids))


def plain_structure(length: int) -> StackStructure:
    """The structure of a sequence without `<bkspc>` (a chain)."""
    return StackStructure(tuple(range(-1, length - 1)), tuple(range(length)), (length,) * length)


def is_plain(structure: StackStructure) -> bool:
    """True when the structure is a chain (no `<bkspc>`): then today's path applies unchanged."""
    return structure.num_pops == 0


def pack_structures(structures: Sequence[StackStructure]) -> StackStructure:
    """Concatenate per-document structures: parents become packed indices; depths and pops stay
    local to each document (pops are compared with positions inside the document)."""
    parents: list[int] = []
    depths: list[int] = []
    pops: list[int] = []
    offset = 0
    for s in structures:
        parents.extend(p + offset if p >= 0 else -1 for p in s.parents)
        depths.extend(s.depths)
        pops.extend(s.pops)
        offset += len(s)
    return StackStructure(tuple(parents), tuple(depths), tuple(pops), sum(s.num_pops for s in structures))


def visible(structure: StackStructure, i: int, j: int) -> bool:
    """Whether key i is visible to query j (one document): i <= j < pops[i]."""
    return i <= j < structure.pops[i]


def reference_outputs(run: Callable[[list[int]], object], structure: StackStructure, length: int | None = None) -> list:
    """The slow exact reference (O(n^2)): for each position j, run(ctx(j)) (indices into the sequence,
    to be run as a plain sequence with positions 0 .. len - 1) and keep its last output.

    `run` receives the list of indices and returns a (len, ...) indexable result.
    """
    n = len(structure) if length is None else length
    return [run(structure.context(j))[-1] for j in range(n)]
