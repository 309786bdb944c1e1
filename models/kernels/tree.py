"""Stack-structured rows (sequences with a `<bkspc>` action): every token has a parent.

A recurrence advances from the parent's state, h_t = A_t h_parent(t) + b_t; a causal
convolution reads the last K-1 ancestors; attention sees ancestors and the token itself.
Tokens are in depth-first order (the order of a stack), so the subtree of token a is
[a, pop[a]) and "a is an ancestor-or-self of t" is a <= t < pop[a].

`StackTree.from_parents(parents)` takes parents (B, L) long, the parent's index in the
same row or -1 at a root (document start); -2 marks a parent held outside this input
(another rank of a sequence-parallel group), which single-process kernels refuse.

`tree_scan` is the exact chunked scan on such rows: inside a chunk of Q tokens the
states are a masked quadratic form over in-chunk ancestors; each token then adds the
state of its deepest ancestor before the chunk (its anchor), advanced through its
in-chunk ancestors. Legend: N flat tokens, C chunks, Q chunk size.
"""

from __future__ import annotations

import torch

TREE_CHUNK = 32


class StackTree:
    """Flat (N = B*L) parents, depths and pops of stack-structured rows, with cached derived tables."""

    def __init__(self, parents_BL: torch.Tensor):
        if parents_BL.ndim != 2:
            raise ValueError(f"parents must be (batch, length), got shape {tuple(parents_BL.shape)}")
        batch, length = parents_BL.shape
        p = parents_BL.to(torch.long)
        if bool(((p < -2) | (p >= length)).any()):
            raise ValueError("parents must be -1 (root), -2 (held elsewhere) or an index into the same row")
        pos = torch.arange(length, device=p.device)
        if bool(((p >= 0) & (p >= pos)).any()):
            raise ValueError("every parent must come before its token (depth-first stack order)")
        self.batch, self.length = batch, length
        self.external = bool((p == -2).any())
        offsets = (torch.arange(batch, device=p.device) * length)[:, None]
        self.parents = torch.where(p >= 0, p + offsets, p).reshape(-1)
        par = self.parents.tolist()
        n = len(par)
        size = [1] * n
        for t in range(n - 1, -1, -1):
            if par[t] >= 0:
                size[par[t]] += size[t]
        depth = [0] * n
        for t in range(n):
            depth[t] = depth[par[t]] + 1 if par[t] >= 0 else 0
        self.pops = torch.tensor([t + size[t] for t in range(n)], dtype=torch.long, device=p.device)
        self.depths = torch.tensor(depth, dtype=torch.long, device=p.device).view(batch, length)
        self._cache: dict = {}

    @classmethod
    def from_parents(cls, parents_BL: torch.Tensor | None) -> "StackTree | None":
        return None if parents_BL is None else cls(parents_BL)

    def require_local(self, what: str) -> None:
        if self.external:
            raise ValueError(
                f"{what}: some tokens' parents are held by another rank; apply hetsp.ssm_parallel.parallelize(model) "
                "to run stack-structured sequences over a group"
            )

    @property
    def num_tokens(self) -> int:
        return self.parents.numel()

    def ancestor(self, m: int) -> torch.Tensor:
        """(N,) flat index of each token's m-th ancestor (0: itself), -1 where there is none."""
        key = ("anc", m)
        if key not in self._cache:
            if m == 0:
                self._cache[key] = torch.arange(self.num_tokens, device=self.parents.device)
            else:
                prev = self.ancestor(m - 1)
                nxt = self.parents[prev.clamp(min=0)].clamp(min=-1)
                self._cache[key] = torch.where(prev >= 0, nxt, torch.full_like(nxt, -1))
        return self._cache[key]

    def visible(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        """Bool (..., nq, nk): key k_idx is an ancestor-or-self of query q_idx (flat indices; -1 never)."""
        qi = q_idx[..., :, None]
        ki = k_idx[..., None, :]
        return (ki >= 0) & (qi >= 0) & (ki <= qi) & (qi < self.pops[ki.clamp(min=0)])

    def chunks(self, q: int):
        """(M (C, Q, Q) bool in-chunk ancestor-or-self, anchor (C, Q) flat index or -1, padded N), cached."""
        key = ("chunks", q)
        if key not in self._cache:
            n = self.num_tokens
            c = max(-(-n // q), 1)
            npad = c * q
            dev = self.parents.device
            par = torch.full((npad,), -1, dtype=torch.long, device=dev)
            par[:n] = self.parents.clamp(min=-1)
            tok = torch.arange(npad, device=dev)
            start = (tok // q) * q
            M = torch.zeros((npad, q), dtype=torch.bool, device=dev)
            M[tok, tok - start] = True
            cur = tok.clone()
            alive = torch.ones(npad, dtype=torch.bool, device=dev)
            for _ in range(q - 1):
                nxt = par[cur]
                inside = alive & (nxt >= start)
                M[tok[inside], (nxt - start)[inside]] = True
                cur = torch.where(inside, nxt, cur)
                alive = inside
            anchor = par[cur]
            self._cache[key] = (M.view(c, q, q), anchor.view(c, q), npad)
        return self._cache[key]


def _pad(t: torch.Tensor, npad: int) -> torch.Tensor:
    return t if t.shape[0] == npad else torch.cat([t, t.new_zeros((npad - t.shape[0], *t.shape[1:]))], 0)


def tree_scan(log_a: torch.Tensor, b: torch.Tensor, tree: StackTree, chunk: int = TREE_CHUNK) -> torch.Tensor:
    """States h (N, *F) of h_t = exp(log_a_t) h_parent(t) + b_t (zero state above a root).

    log_a (N, *Fa) with Fa a prefix of F (broadcast over the rest), real or complex; b (N, *F).
    """
    tree.require_local("tree_scan")
    M, anchor, npad = tree.chunks(chunk)
    n = b.shape[0]
    extra = b.dim() - log_a.dim()
    dtype = torch.promote_types(log_a.dtype, b.dtype)
    la = _pad(log_a.to(dtype), npad).view(-1, chunk, *log_a.shape[1:])
    bb = _pad(b.to(dtype), npad).view(-1, chunk, *b.shape[1:])
    Mf = M.to(la.real.dtype if la.is_complex() else la.dtype)
    cum = torch.einsum("cij,cj...->ci...", Mf.to(dtype), la)  # sum of log decays over in-chunk ancestors-or-self
    states: list[torch.Tensor] = []
    zero = bb.new_zeros(bb.shape[2:])
    anchors = anchor.tolist()
    for c in range(M.shape[0]):
        diff = cum[c][:, None] - cum[c][None, :]  # (Q, Q, *Fa)
        m = M[c].view(chunk, chunk, *([1] * (diff.dim() - 2)))
        w = torch.where(m, torch.exp(torch.where(m, diff, torch.zeros_like(diff))), torch.zeros_like(diff))
        w = w.view(*w.shape, *([1] * extra))
        h = (w * bb[c][None]).sum(1)
        uniq = sorted({a for a in anchors[c] if a >= 0})
        if uniq:
            rows = torch.stack([zero] + [states[a // chunk][a % chunk] for a in uniq])
            where = {a: i + 1 for i, a in enumerate(uniq)}
            sel = torch.tensor([where.get(a, 0) for a in anchors[c]], device=h.device)
            decay = torch.exp(cum[c]).view(chunk, *log_a.shape[1:], *([1] * extra))
            h = h + decay * rows[sel]
        states.append(h)
    return torch.cat(states, 0)[:n]


def last_states(h: torch.Tensor, batch: int, length: int, cu_seqlens) -> torch.Tensor:
    """(S, *F): the state at the last token of each segment (of each row without cu_seqlens)."""
    if cu_seqlens is None:
        ends = torch.arange(1, batch + 1, device=h.device) * length - 1
    else:
        ends = cu_seqlens.to(device=h.device, dtype=torch.long)[1:] - 1
    return h[ends.clamp(min=0)]


def tree_conv_sources(tree: StackTree, k: int) -> list[torch.Tensor]:
    """For taps 0..K-1 (tap K-1 is the token itself), the flat index of the ancestor it reads (-1: zero)."""
    tree.require_local("causal_conv1d")
    return [tree.ancestor(k - 1 - tap) for tap in range(k)]


def tree_kw(tree: StackTree | None) -> dict:
    """Keyword arguments that hand a kernel the tree, or none at all for plain rows (today's call)."""
    return {} if tree is None else {"tree": tree}
