"""HybridForCausalLM on `<bkspc>` sequences in one process: every mixer kind against the per-context reference."""

from __future__ import annotations

import random

import pytest
import torch

from hetsp.backspace import pack_structures, reference_outputs, stack_structure
from models.kernels.tree import StackTree, tree_lti_scan, tree_scan, tree_ssd_scan

from .backspace_fns import BK, deep_pop_ids, random_backspace_ids
from .test_models import ALL_KINDS, tiny_model

KINDS = ["attention", "s4d", "ema", "mamba2", "seqboat", ALL_KINDS]


pytestmark = pytest.mark.usefixtures("one_thread")


def sample_docs(seed, lengths=(13, 9)):
    rng = random.Random(seed)
    docs = []
    for i, n in enumerate(lengths):
        ids = deep_pop_ids(n) if i % 2 else random_backspace_ids(rng, n, prompt=2, p_pop=0.35)
        prompt = n // 4 if i % 2 else 2
        docs.append((ids, stack_structure(ids, BK, vocab_size=41, prompt_length=prompt)))
    return docs


def packed_parents(structure) -> torch.Tensor:
    return torch.tensor(structure.parents)[None]


def reference_logits_and_loss_grads(model, docs, weights):
    """Per position j: the model on the plain sequence ctx(j) (positions 0..), last logits."""
    model.zero_grad()
    rows = []
    for ids, s in docs:
        rows += reference_outputs(lambda idx, ids=ids: model(input_ids=torch.tensor([[ids[i] for i in idx]])).logits[0], s)
    logits = torch.stack(rows)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kinds", KINDS)
def test_tree_forward_matches_per_context_reference(kinds):
    """Outputs and every parameter gradient, fp64, rel 1e-9 (rounding of different summation orders)."""
    model = tiny_model(kinds)
    docs = sample_docs(3)
    ids = torch.tensor([t for d, _ in docs for t in d])[None]
    structure = pack_structures([s for _, s in docs])
    cu = torch.tensor([0, len(docs[0][0]), ids.shape[1]], dtype=torch.int32)
    weights = torch.randn(ids.shape[1], model.config.vocab_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want, want_grads = reference_logits_and_loss_grads(model, docs, weights)
    model.zero_grad()
    got = model(input_ids=ids, cu_seqlens=cu, parents=packed_parents(structure)).logits[0]
    (got * weights).sum().backward()
    torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-11)
    for n, p in model.named_parameters():
        if n in want_grads:
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-9, atol=1e-11, msg=n)


def test_tree_scan_matches_sequential_recurrence():
    """tree_scan against h_t = a_t h_parent + b_t token by token (fp64), several chunk sizes."""
    rng = random.Random(0)
    ids = random_backspace_ids(rng, 70, prompt=3, p_pop=0.4)
    s = stack_structure(ids, BK, vocab_size=41, prompt_length=3)
    tree = StackTree(torch.tensor(s.parents)[None])
    g = torch.Generator().manual_seed(0)
    log_a = -torch.rand(70, 3, generator=g, dtype=torch.float64)
    b = torch.randn(70, 3, 2, generator=g, dtype=torch.float64)
    want = []
    for t in range(70):
        prev = want[s.parents[t]] if s.parents[t] >= 0 else torch.zeros(3, 2, dtype=torch.float64)
        want.append(torch.exp(log_a[t])[:, None] * prev + b[t])
    for chunk in (1, 4, 32):
        torch.testing.assert_close(tree_scan(log_a, b, tree, chunk), torch.stack(want), rtol=1e-12, atol=1e-12)


def test_parents_held_elsewhere_are_refused():
    model = tiny_model("s4d")
    with pytest.raises(ValueError, match="another rank"):
        model(input_ids=torch.tensor([[1, 2, 3]]), parents=torch.tensor([[-2, 0, 1]]))


def test_cache_with_parents_is_refused():
    model = tiny_model("s4d")
    with pytest.raises(ValueError, match="takes no cache"):
        model(input_ids=torch.tensor([[1, 2, 3]]), parents=torch.tensor([[-1, 0, 0]]), use_cache=True)


def test_readout_scans_match_all_states_scan():
    """tree_lti_scan (complex, S4D-like) and tree_ssd_scan against tree_scan's states read out, outputs and
    the states at the requested tokens, with gradients; fp64 rel 1e-10 (rounding of summation orders)."""
    rng = random.Random(1)
    ids = random_backspace_ids(rng, 75, prompt=2, p_pop=0.4)
    s = stack_structure(ids, BK, vocab_size=41, prompt_length=2)
    tree = StackTree(torch.tensor(s.parents)[None])
    g = torch.Generator().manual_seed(2)
    last = [10, 74]
    A = torch.complex(torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.9, torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.3)
    B = torch.randn(3, 4, generator=g, dtype=torch.complex128)
    C = torch.randn(3, 4, generator=g, dtype=torch.complex128)
    u = torch.randn(75, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for chunk in (4, 32):
        y, fin = tree_lti_scan(u, A, B, C, tree, last, chunk)
        h = tree_scan(torch.log(A).expand(75, 3, 4), B * u[..., None].to(A.dtype), tree, chunk)
        torch.testing.assert_close(y, (C * h).sum(-1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fin, h[last], rtol=1e-10, atol=1e-12)
        g1 = torch.autograd.grad(y.real.sum(), u)[0]
        g2 = torch.autograd.grad((C * h).sum(-1).real.sum(), u)[0]
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    la = -torch.rand(75, 2, generator=g, dtype=torch.float64)
    xdt = torch.randn(75, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    Bs = torch.randn(75, 2, 5, generator=g, dtype=torch.float64)
    Cs = torch.randn(75, 2, 5, generator=g, dtype=torch.float64)
    for chunk in (4, 32):
        y, fin = tree_ssd_scan(la, xdt, Bs, Cs, tree, last, chunk)
        h = tree_scan(la, xdt[..., None] * Bs[:, :, None, :], tree, chunk)
        want = torch.einsum("thpn,thn->thp", h, Cs)
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fin, h[last], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(y.sum(), xdt)[0], torch.autograd.grad(want.sum(), xdt)[0], rtol=1e-10, atol=1e-12)
