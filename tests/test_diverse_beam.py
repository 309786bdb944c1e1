"""Diverse Beam Search against brute-force enumeration on a tiny vocabulary and length."""

import itertools

import pytest
import torch

from hetsp.generation.diverse_beam import diverse_beam_search

from . import step_fns

V, L = 3, 3


class TinyVocab(torch.nn.Module):
    """The step tests' tiny Llama restricted to the first V tokens (logits of the others dropped),
    with hetsp's attention (as search runs it) or stock attention (for the brute force)."""

    def __init__(self, attn):
        super().__init__()
        self.inner = step_fns.tiny_model(attn, torch.float64)
        self.config = self.inner.config

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits[..., :V]
        return out


@torch.no_grad()
def seq_logps(model, prompt, seq):
    """Per-step log p of `seq` after `prompt`, from one stock forward."""
    logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + list(seq)])).logits[0].double(), -1)
    return [float(logp[len(prompt) + t - 1, seq[t]]) for t in range(len(seq))]


@pytest.fixture(scope="module")
def model():
    from hetsp.attention import register_attention

    return TinyVocab(register_attention()).eval()


@pytest.fixture(scope="module")
def stock():
    return TinyVocab("sdpa").eval()


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_group_is_the_brute_force_top_of_its_augmented_score(model, stock, use_cache):
    """Beam width V^(L-1) holds every prefix, so each group's beams are exactly the top B' of all
    V^L sequences by sum_t [log p + lambda * (-count of earlier groups' step-t tokens equal to y_t)]."""
    prompt, lam, G, width = [5, 7], 0.7, 3, V ** (L - 1)
    groups = diverse_beam_search(model, prompt, G * width, G, lam, L, kernel="reference", use_cache=use_cache)
    all_seqs = list(itertools.product(range(V), repeat=L))
    logps = {s: seq_logps(stock, prompt, s) for s in all_seqs}
    earlier_tokens = [[] for _ in range(L)]  # per step: the tokens earlier groups' beams hold there
    for g in range(G):
        def score(s):
            return sum(logps[s][t] - lam * earlier_tokens[t].count(s[t]) for t in range(L))

        want = sorted(all_seqs, key=score, reverse=True)[:width]
        got = [tuple(b.tokens) for b in groups[g]]
        assert got == want
        for b, s in zip(groups[g], want):
            # fp64; ring-attention kernel against stock attention: summation order only
            assert b.score == pytest.approx(score(s), rel=1e-9, abs=1e-12)
        # the group's step-t choices: the last tokens of its best `width` prefixes of length t + 1
        kept_prefixes = {}
        for t in range(L):
            prefixes = {}
            for s in all_seqs:
                p = s[: t + 1]
                prefixes[p] = max(prefixes.get(p, -1e300), sum(logps[s][u] - lam * earlier_tokens[u].count(s[u]) for u in range(t + 1)))
            top = sorted(prefixes, key=prefixes.get, reverse=True)[:width]
            kept_prefixes[t] = [p[-1] for p in top]
        for t in range(L):
            earlier_tokens[t] += kept_prefixes[t]


def test_lambda_zero_is_independent_beam_searches_and_groups_do_not_change_earlier_ones(model):
    prompt = [3]
    one = diverse_beam_search(model, prompt, 4, 1, 0.0, 4)
    many = diverse_beam_search(model, prompt, 12, 3, 0.0, 4)
    for g in many:
        assert [b.tokens for b in g] == [b.tokens for b in one[0]]
    two = diverse_beam_search(model, prompt, 8, 2, 0.5, 4)
    three = diverse_beam_search(model, prompt, 12, 3, 0.5, 4)
    assert [[b.tokens for b in g] for g in two] == [[b.tokens for b in g] for g in three[:2]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_groups"):
        diverse_beam_search(None, [1], 5, 2)
    with pytest.raises(ValueError, match="prompt"):
        diverse_beam_search(None, [], 4, 2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        diverse_beam_search(None, [1], 4, 2, max_new_tokens=0)
