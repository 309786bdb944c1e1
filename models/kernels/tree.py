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
    """States h (N, *F) of h_t = exp(log_a_t) h_parent(t) + b_t (zero state above a root), for every token.

    log_a (N, *Fa) with Fa a prefix of F (broadcast over the rest), real or complex; b (N, *F).
    The plain form of `tree_lti_scan` / `tree_ssd_scan`, which read out without every state.
    """
    tree.require_local("tree_scan")
    M, anchor, npad = tree.chunks(chunk)
    n = b.shape[0]
    fa = log_a.shape[1:]
    extra = b.dim() - log_a.dim()
    dtype = torch.promote_types(log_a.dtype, b.dtype)
    bb = _pad(b.to(dtype), npad).view(-1, chunk, *b.shape[1:])
    la = _pad(log_a.to(dtype), npad).view(-1, chunk, *fa)
    cum = torch.einsum("cij,cj...->ci...", M.to(dtype), la)  # sum of log decays over in-chunk ancestors-or-self
    states: list[torch.Tensor] = []
    anchors = anchor.tolist()
    for c in range(M.shape[0]):
        w = _pair_decay(cum[c], M[c])
        h = torch.einsum("ijf,jfr->ifr", w.reshape(chunk, chunk, -1), bb[c].reshape(chunk, w[0, 0].numel(), -1)).reshape(bb[c].shape)
        h_anchor, any_anchor = _anchor_rows(anchors[c], lambda a: states[a // chunk][a % chunk], bb.new_zeros(bb.shape[2:]), h.device)
        if any_anchor:
            h = h + torch.exp(cum[c]).view(chunk, *fa, *([1] * extra)) * h_anchor
        states.append(h)
    return torch.cat(states, 0)[:n]


def _pair_decay(cum_QF: torch.Tensor, M_QQ: torch.Tensor) -> torch.Tensor:
    """(Q, Q, *F): exp(cum_i - cum_j) where j is an in-chunk ancestor-or-self of i, else 0 (no overflow)."""
    diff = cum_QF[:, None] - cum_QF[None, :]
    m = M_QQ.view(*M_QQ.shape, *([1] * (diff.dim() - 2)))
    return torch.where(m, torch.exp(torch.where(m, diff, torch.zeros_like(diff))), torch.zeros_like(diff))


def _anchor_rows(anchors_row, state_of, zero, device):
    """(Q, *S) state of each token's anchor (zero without one), and whether any token has one."""
    uniq = sorted({a for a in anchors_row if a >= 0})
    if not uniq:
        return None, False
    rows = torch.stack([zero] + [state_of(a) for a in uniq])
    where = {a: i + 1 for i, a in enumerate(uniq)}
    return rows[torch.tensor([where.get(a, 0) for a in anchors_row], device=device)], True


def _exported(anchors, last) -> set[int]:
    return {a for row in anchors for a in row if a >= 0} | {int(t) for t in last}


def tree_ssd_scan(la: torch.Tensor, xdt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, tree: StackTree, last, chunk: int = TREE_CHUNK):
    """Mamba-2's recurrence on a tree, read out: h_t = exp(la_t) h_parent(t) + xdt_t B_t^T, y_t = h_t C_t.

    la (N, H); xdt (N, H, P); B, C (N, H, Ns) (heads already expanded). Returns y (N, H, P) and the
    states (len(last), H, P, Ns) at flat indices `last`. Inside a chunk y is the SSD quadratic form
    with the in-chunk ancestor mask; full states only for anchors and `last`.
    """
    tree.require_local("tree_scan")
    M, anchor, npad = tree.chunks(chunk)
    n, H, P = xdt.shape
    Ns = B.shape[-1]
    view = lambda t: _pad(t, npad).view(-1, chunk, *t.shape[1:])  # noqa: E731
    lac, xc, Bc, Cc = view(la), view(xdt), view(B), view(C)
    cum = torch.einsum("cij,cjh->cih", M.to(la.dtype), lac)
    anchors = anchor.tolist()
    exported = _exported(anchors, last)
    states: dict[int, torch.Tensor] = {}
    ys = []
    for c in range(M.shape[0]):
        w = _pair_decay(cum[c], M[c])  # (Q, Q, H)
        y = torch.einsum("ijh,ihn,jhn,jhp->ihp", w, Cc[c], Bc[c], xc[c])
        h_anchor, any_anchor = _anchor_rows(anchors[c], states.__getitem__, xdt.new_zeros((H, P, Ns)), xdt.device)
        if any_anchor:
            y = y + torch.exp(cum[c])[..., None] * torch.einsum("ihpn,ihn->ihp", h_anchor, Cc[c])
        mine = [t for t in range(c * chunk, min((c + 1) * chunk, n)) if t in exported]
        if mine:
            loc = torch.tensor([t - c * chunk for t in mine], device=xdt.device)
            h_e = torch.einsum("ejh,jhp,jhn->ehpn", w[loc], xc[c], Bc[c])
            if any_anchor:
                h_e = h_e + torch.exp(cum[c][loc])[..., None, None] * h_anchor[loc]
            for i, t in enumerate(mine):
                states[t] = h_e[i]
        ys.append(y)
    finals = torch.stack([states[int(t)] for t in last]) if len(last) else xdt.new_zeros((0, H, P, Ns))
    return torch.cat(ys, 0)[:n], finals


def tree_lti_scan(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, tree: StackTree, last, chunk: int = TREE_CHUNK):
    """Time-invariant diagonal recurrence on a tree, read out: y_t = sum_n C h_t with h_t = A h_parent(t) + B u_t.

    u (N, H); A, B, C (H, Ns). Returns y (N, H) in A's dtype and the states (len(last), H, Ns) at the
    flat token indices `last`. Inside a chunk y is a masked convolution with K[d] = sum_n C A^d B over
    in-chunk ancestors (d: depth difference); full states are formed only for the tokens later chunks
    branch from (anchors) and for `last`, so no (Q, Q, H, Ns) tensor is ever built for all tokens.
    """
    tree.require_local("tree_scan")
    M, anchor, npad = tree.chunks(chunk)
    n, H = u.shape
    uu = _pad(u.to(A.dtype), npad).view(-1, chunk, H)
    cnt = M.sum(-1)  # (C, Q)
    powers = torch.exp(torch.arange(chunk + 1, device=u.device, dtype=A.real.dtype)[:, None, None] * torch.log(A))  # (Q+1, H, Ns)
    ktab = (powers * (B * C)).sum(-1)  # (Q+1, H)
    anchors = anchor.tolist()
    exported = _exported(anchors, last)
    states: dict[int, torch.Tensor] = {}
    ys = []
    for c in range(M.shape[0]):
        dd = (cnt[c][:, None] - cnt[c][None, :]).clamp(min=0)
        w = ktab[dd] * M[c][..., None]  # (Q, Q, H)
        y = torch.einsum("ijh,jh->ih", w, uu[c])
        h_anchor, any_anchor = _anchor_rows(anchors[c], states.__getitem__, A.new_zeros(A.shape), u.device)
        if any_anchor:
            y = y + (C * powers[cnt[c]] * h_anchor).sum(-1)
        mine = [t for t in range(c * chunk, min((c + 1) * chunk, n)) if t in exported]
        if mine:
            loc = torch.tensor([t - c * chunk for t in mine], device=u.device)
            w_e = powers[dd[loc]] * M[c][loc][..., None, None]  # (E, Q, H, Ns)
            h_e = torch.einsum("ejhn,jh->ehn", w_e, uu[c]) * B
            if any_anchor:
                h_e = h_e + powers[cnt[c][loc]] * h_anchor[loc]
            for i, t in enumerate(mine):
                states[t] = h_e[i]
        ys.append(y)
    finals = torch.stack([states[int(t)] for t in last]) if len(last) else A.new_zeros((0, *A.shape))
    return torch.cat(ys, 0)[:n], finals


def segment_last(batch: int, length: int, cu_seqlens) -> list[int]:
    """Flat index of the last token of each segment (of each row without cu_seqlens)."""
    if cu_seqlens is None:
        return [(r + 1) * length - 1 for r in range(batch)]
    return [max(int(e) - 1, 0) for e in cu_seqlens[1:]]


def tree_conv_sources(tree: StackTree, k: int) -> list[torch.Tensor]:
    """For taps 0..K-1 (tap K-1 is the token itself), the flat index of the ancestor it reads (-1: zero)."""
    tree.require_local("causal_conv1d")
    return [tree.ancestor(k - 1 - tap) for tap in range(k)]


def tree_kw(tree: StackTree | None) -> dict:
    """Keyword arguments that hand a kernel the tree, or none at all for plain rows (today's call)."""
    return {} if tree is None else {"tree": tree}
