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


def _exported(anchor_CQ: torch.Tensor, last, chunk: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Tokens whose full state is needed (every anchor, and `last`), in order; their chunk and in-chunk index."""
    tokens = sorted({a for a in anchor_CQ.flatten().tolist() if a >= 0} | {int(t) for t in last})
    t = torch.tensor(tokens, dtype=torch.long, device=anchor_CQ.device)
    return tokens, t // chunk, t % chunk


def _propagate(tokens, local, decay, anchor_flat, zero):
    """States of the exported tokens in order: h_e = local_e + decay_e * h_anchor(e) (the only sequential step),
    and the table [zero; h_e...] with, for every token, its anchor's row in it."""
    index = {t: i + 1 for i, t in enumerate(tokens)}
    anchors = anchor_flat.tolist()
    states = []
    for i, t in enumerate(tokens):
        a = anchors[t]
        states.append(local[i] if a < 0 else local[i] + decay[i] * states[index[a] - 1])
    table = torch.stack([zero] + states)
    rows = torch.tensor([index.get(a, 0) for a in anchors], dtype=torch.long, device=zero.device)
    return table, rows


def tree_ssd_scan(la: torch.Tensor, xdt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, tree: StackTree, last, chunk: int = TREE_CHUNK):
    """Mamba-2's recurrence on a tree, read out: h_t = exp(la_t) h_parent(t) + xdt_t B_t^T, y_t = h_t C_t.

    la (N, H); xdt (N, H, P); B, C (N, H, Ns) (heads already expanded). Returns y (N, H, P) and the
    states (len(last), H, P, Ns) at flat indices `last`. All chunks at once: the SSD quadratic form
    with the in-chunk ancestor mask, plus exp(cum) C h_anchor; full states only for the exported tokens.
    """
    tree.require_local("tree_scan")
    M, anchor, npad = tree.chunks(chunk)
    n, H, P = xdt.shape
    Ns = B.shape[-1]
    view = lambda t: _pad(t, npad).view(-1, chunk, *t.shape[1:])  # noqa: E731
    lac, xc, Bc, Cc = view(la), view(xdt), view(B), view(C)
    cum = torch.einsum("cij,cjh->cih", M.to(la.dtype), lac)
    diff = cum[:, :, None] - cum[:, None, :]
    m = M[..., None]
    w = torch.where(m, torch.exp(torch.where(m, diff, torch.zeros_like(diff))), torch.zeros_like(diff))  # (C, Q, Q, H)
    cb = torch.einsum("cihn,cjhn->cijh", Cc, Bc)
    y = torch.einsum("cijh,cjhp->cihp", w * cb, xc)
    tokens, ce, le = _exported(anchor, last, chunk)
    local = torch.einsum("ejh,ejhp,ejhn->ehpn", w[ce, le], xc[ce], Bc[ce])
    decay = torch.exp(cum[ce, le])[..., None, None]
    table, rows = _propagate(tokens, local, decay, anchor.flatten(), xdt.new_zeros((H, P, Ns)))
    y = y + torch.exp(cum)[..., None] * torch.einsum("cihpn,cihn->cihp", table[rows].view(-1, chunk, H, P, Ns), Cc)
    finals = table[[tokens.index(int(t)) + 1 for t in last]]
    return y.reshape(-1, H, P)[:n], finals


def tree_lti_scan(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, tree: StackTree, last, chunk: int = TREE_CHUNK):
    """Time-invariant diagonal recurrence on a tree, read out: y_t = sum_n C h_t with h_t = A h_parent(t) + B u_t.

    u (N, H); A, B, C (H, Ns). Returns y (N, H) in A's dtype and the states (len(last), H, Ns) at the
    flat token indices `last`. Inside a chunk y is a masked convolution with K[d] = sum_n C A^d B over
    in-chunk ancestors (d: depth difference), all chunks at once; full states are formed only for the
    tokens later chunks branch from (anchors) and for `last`.
    """
    tree.require_local("tree_scan")
    M, anchor, npad = tree.chunks(chunk)
    n, H = u.shape
    uu = _pad(u.to(A.dtype), npad).view(-1, chunk, H)
    cnt = M.sum(-1)  # (C, Q) in-chunk ancestors-or-self
    powers = torch.exp(torch.arange(chunk + 1, device=u.device, dtype=A.real.dtype)[:, None, None] * torch.log(A))  # (Q+1, H, Ns)
    ktab = (powers * (B * C)).sum(-1)  # (Q+1, H)
    dd = (cnt[:, :, None] - cnt[:, None, :]).clamp(min=0)  # (C, Q, Q)
    y = torch.einsum("cijh,cjh->cih", ktab[dd] * M[..., None], uu)
    tokens, ce, le = _exported(anchor, last, chunk)
    w_e = powers[dd[ce, le]] * M[ce, le][..., None, None]  # (E, Q, H, Ns)
    local = torch.einsum("ejhn,ejh->ehn", w_e, uu[ce]) * B
    table, rows = _propagate(tokens, local, powers[cnt[ce, le]], anchor.flatten(), A.new_zeros(A.shape))
    y = y + (C * powers[cnt].view(-1, chunk, H, A.shape[1]) * table[rows].view(-1, chunk, H, A.shape[1])).sum(-1)
    finals = table[[tokens.index(int(t)) + 1 for t in last]]
    return y.reshape(-1, H)[:n], finals


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
