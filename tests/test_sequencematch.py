"""SequenceMatch: the loss against token cross-entropy and against REFERENCE.md's per-position
formula, the invariant under random plans (groups 1-4, noise pairs on shard boundaries),
noise injection, the schedule, the `<bkspc>` token in tokenizers and models, bad inputs.

Tolerances: fp64 throughout. rel 1e-12 / abs 1e-14 where the two sides differ only by
rounding of a few additions per position; rel 1e-9 / abs 1e-12 for whole plans (different
summation orders across ranks and ring blocks, as in test_backspace_plans)."""

from __future__ import annotations

import random

import pytest
import torch

from hetsp.backspace import stack_structure
from hetsp.data.noise import inject_noise
from hetsp.data.tokenizer import ByteTokenizer, add_bkspc, check_bkspc_id, load_tokenizer
from hetsp.executor import PlainEngine, run_plan
from hetsp.objectives.lm import LanguageModeling
from hetsp.objectives.sequencematch import (SequenceMatch, SequenceMatchConfig, Trajectory, add_bkspc_rows,
                                            reference_loss)
from hetsp.plan import Group, MicroBatch, Plan

from . import backspace_fns
from .backspace_fns import BK
from .test_ssm_parallel import ALL_FIVE

LLAMA = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)
EOS = 7  # the tests' sequences use ids 0..7; 7 acts as the end of sequence (done)
VOCAB = 61  # tests/ssm_fns.VOCAB
EXACT = dict(rtol=1e-12, atol=1e-14)
PLAN_TOL = dict(rtol=1e-9, atol=1e-12)


def _objective(**kw) -> SequenceMatch:
    return SequenceMatch(SequenceMatchConfig(**kw), eos_token_id=EOS, bkspc_token_id=BK)


def _one_process(model, sequences, objective, structures=None):
    """Loss (mean over units) and gradients through the executor as one group of one."""
    lengths = [len(s) for s in sequences]
    plan = Plan(lengths, (MicroBatch((Group(0, 1, tuple(range(len(lengths)))),)),))
    model.zero_grad()
    res = run_plan(PlainEngine(model), plan, sequences, 0, 1, torch.device("cpu"), objective, "torch_cpu", structures=structures)
    return res.loss_sum / res.num_units, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model(family="hybrid", kwargs=ALL_FIVE):
    from hetsp.attention import register_attention
    from hetsp.ssm_parallel import parallelize

    return parallelize(backspace_fns._model(family, kwargs, register_attention()))


def test_no_chi2_data_only_gamma1_equals_cross_entropy():
    rng = random.Random(0)
    seqs = [[rng.randrange(8) for _ in range(n)] for n in (13, 5, 20)]
    seqs[0][6] = EOS  # a real end inside a sequence (done), the others cut by the window
    seqs[2][-1] = EOS
    model = _model()
    sm_loss, sm_grads = _one_process(model, seqs, _objective(gamma=1.0, chi2=0.0, w_data=1.0, alpha=1.0))
    ce_loss, ce_grads = _one_process(model, seqs, LanguageModeling())
    torch.testing.assert_close(torch.tensor(sm_loss), torch.tensor(ce_loss), **EXACT)
    assert sm_grads.keys() == ce_grads.keys()
    for name in ce_grads:
        torch.testing.assert_close(sm_grads[name], ce_grads[name], **EXACT, msg=lambda m: f"{name}: {m}")


def _noisy_batch(seed):
    """Noise-injected trajectories: random ones, and one with its pairs exactly on the zigzag
    chunk boundaries of groups of 2, 3 and 4 (24 tokens: boundaries at 6|... , 4|8|12, 3|6|9|12)."""
    rng = random.Random(seed)
    seqs = []
    for n, prompt in ((15, 2), (9, 1), (5, 0)):
        clean = [rng.randrange(7) for _ in range(n)]
        clean[-2] = EOS
        seqs.append(inject_noise(clean, 0.35, rng, BK, num_real=7, prompt_length=prompt))
    ids, noise = [], []
    for j in range(24):
        if j in (5, 11, 17):  # wrong token ends a chunk, its <bkspc> starts the next one
            ids.append(rng.randrange(7)), noise.append(True)
        elif j in (6, 12, 18):
            ids.append(BK), noise.append(False)
        else:
            ids.append(EOS if j == 20 else rng.randrange(7)), noise.append(False)
    seqs.append(Trajectory(ids, noise, prompt_length=2))
    model_traj = Trajectory([1, 2, 3, 4, BK, 5, 6, BK, BK, 2, EOS, 3], prompt_length=2, source="model")
    seqs.append(model_traj)
    structures = [stack_structure(s, BK, VOCAB, s.prompt_length) for s in seqs]
    return seqs, structures


def test_noisy_loss_equals_per_position_formula():
    seqs, structures = _noisy_batch(1)
    assert any(any(s.noise) for s in seqs)
    obj = _objective(gamma=0.9, chi2=0.7, w_data=0.5, alpha=0.6)
    model = _model()
    loss, grads = _one_process(model, seqs, obj, structures)
    ref_loss, ref_grads = backspace_fns.per_context_reference(seqs, structures, "hybrid", ALL_FIVE, obj)
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), **PLAN_TOL)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, **PLAN_TOL, msg=lambda m: f"{name}: {m}")


def test_reference_formula_by_hand():
    """reference_loss against the formula typed out for a 4-token trajectory with one noise action."""
    g, c, w = 0.8, 0.3, 0.5
    obj = _objective(gamma=g, chi2=c, w_data=w, alpha=1.0)
    traj = Trajectory([1, 3, BK, EOS], noise=[False, True, False, False])
    logits = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    V = torch.logsumexp(logits, 1)
    r0 = logits[0, 3] - g * V[1]  # noise action: value term only
    r1 = logits[1, BK] - g * V[2]
    r2 = logits[2, EOS]  # done
    want = (w * (V[0] - g * V[1])
            + g * (-r1 + c * r1 ** 2) + w * g * (V[1] - g * V[2])
            + g ** 2 * (-r2 + c * r2 ** 2) + w * g ** 2 * V[2])
    del r0
    torch.testing.assert_close(reference_loss([logits], [traj], obj), want, **EXACT)


def _plans(lengths, rng):
    """Random plans over 4 ranks: groups of 1 to 4, every sequence placed once, one or two micro-batches."""
    plans = []
    n = len(lengths)
    for _ in range(3):
        order = list(range(n))
        rng.shuffle(order)
        mbs, k = [], 0
        for _m in range(rng.choice((1, 2))):
            sizes, left = [], 4
            while left:
                sizes.append(rng.randint(1, left))
                left -= sizes[-1]
            groups, start = [], 0
            for size in sizes:
                groups.append([start, size, []])
                start += size
            mbs.append(groups)
        for s in order:
            mb = rng.randrange(len(mbs))
            rng.choice(mbs[mb])[2].append(s)
        plans.append(Plan(lengths, tuple(MicroBatch(tuple(Group(a, b, tuple(c)) for a, b, c in mb)) for mb in mbs)))
    # fixed: every sequence alone in one group of 4, then of 3, then of 2 (the boundary pairs)
    plans.append(Plan(lengths, (MicroBatch((Group(0, 4, tuple(range(n))),)),)))
    plans.append(Plan(lengths, (MicroBatch((Group(0, 3, tuple(range(n))), Group(3, 1))),)))
    plans.append(Plan(lengths, (MicroBatch((Group(0, 2, (3,)), Group(2, 2, (0, 1, 2, 4)))),)))
    return plans


@pytest.mark.parametrize("family,model_kwargs", [("hybrid", ALL_FIVE), ("llama", LLAMA)], ids=["hybrid-all-five", "llama"])
def test_plans_match_one_process(rank_pool, family, model_kwargs):
    seqs, structures = _noisy_batch(2)
    lengths = [len(s) for s in seqs]
    plans = _plans(lengths, random.Random(3))
    obj = _objective(gamma=0.95, chi2=0.5, w_data=0.5, alpha=0.7)
    cases = [(seqs, structures, p.to_json()) for p in plans]
    results = rank_pool(4).run(backspace_fns.plan_steps, cases, family, model_kwargs, "torch_cpu", obj)
    ref_loss, ref_grads = backspace_fns.per_context_reference(seqs, structures, family, model_kwargs, obj)
    backspace_fns.assert_plans_match(results, len(plans), ref_loss, ref_grads, PLAN_TOL)


def test_schedule_behaviour_cloning_then_mix():
    seqs, _ = _noisy_batch(4)
    data = [s for s in seqs if s.source == "data"]
    obj = _objective(gamma=0.9, chi2=0.5, alpha=0.25, bc_steps=3)
    logits = [torch.randn(len(s), VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(data)]
    ml = sum(float(reference_loss([l], [s], _objective(alpha=0.0))) for l, s in zip(logits, data))
    sm = sum(float(reference_loss([l], [s], _objective(gamma=0.9, chi2=0.5, alpha=1.0))) for l, s in zip(logits, data))
    for step, want in ((0, ml), (2, ml), (3, 0.75 * ml + 0.25 * sm), (10, 0.75 * ml + 0.25 * sm)):
        obj.set_step(step)
        got = sum(float(reference_loss([l], [s], obj)) for l, s in zip(logits, data))
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **EXACT)
    # the maximum-likelihood part leaves the noise actions out
    t = Trajectory([1, 4, BK, 2], noise=[False, True, False, False])
    lg = logits[0][:4]
    want = sum(torch.logsumexp(lg[j], 0) - lg[j, t[j + 1]] for j in (1, 2))
    torch.testing.assert_close(reference_loss([lg], [t], _objective(alpha=0.0)), want, **EXACT)


# ---------------------------------------------------------------- noise injection

def test_inject_noise_pairs_and_mask():
    rng = random.Random(0)
    clean = [rng.randrange(7) for _ in range(200)]
    traj = inject_noise(clean, 0.3, random.Random(5), BK, num_real=7, prompt_length=3)
    stack = []
    for j, t in enumerate(traj):
        if t == BK:
            assert traj.noise[j - 1] and stack.pop() == j - 1  # pops exactly the wrong token
        else:
            stack.append(j)
    assert [traj[j] for j in stack] == clean  # popping restores the clean sequence
    for j, t in enumerate(traj):
        if traj.noise[j]:
            assert traj[j + 1] == BK and t != traj[j + 2] and j >= 3
    pairs = sum(traj.noise)
    assert 0.2 * 197 < pairs < 0.4 * 197  # about p per target (binomial(197, 0.3): sd 6.4)
    assert inject_noise(clean, 0.0, rng, BK, num_real=7) == clean


def test_inject_noise_from_model_proposals():
    clean = [1, 2, 3, 4, 5, 6]
    proposals = torch.full((6, 10), -1e9, dtype=torch.float64)
    proposals[:, 0] = 5.0  # the model's favourite wrong token is 0, except where 0 is the target
    proposals[:, BK] = 50.0  # <bkspc> is never proposed as a wrong token
    traj = inject_noise(clean, 0.99, random.Random(1), BK, num_real=9, proposals=proposals)
    assert [t for t, n in zip(traj, traj.noise) if n] == [0] * sum(traj.noise) and sum(traj.noise) >= 3


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_noise_probability(p):
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\)"):
        inject_noise([1, 2, 3], p, random.Random(0), BK, num_real=7)
    with pytest.raises(ValueError, match="noise_p"):
        SequenceMatchConfig(noise_p=p)


def test_all_noise_sequence_refused():
    with pytest.raises(ValueError, match="all noise"):
        inject_noise([1, 2, 3], 0.5, random.Random(0), BK, num_real=7, prompt_length=3)
    rng = random.Random(0)
    while True:  # a cut that leaves only the injected wrong token as an action
        try:
            inject_noise([1, 2, 3, 4], 0.9, rng, BK, num_real=7, prompt_length=2, max_length=3)
        except ValueError as e:
            assert "every action is injected noise" in str(e)
            break


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.0001])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        SequenceMatchConfig(gamma=gamma)


def test_config_unknown_key():
    with pytest.raises(ValueError, match="unknown key"):
        SequenceMatchConfig.from_dict({"gama": 0.9})
    assert SequenceMatchConfig.from_dict({"gamma": 0.5, "noise_source": "model"}).gamma == 0.5


# ---------------------------------------------------------------- the <bkspc> token

def test_byte_tokenizer_bkspc():
    tok = add_bkspc(ByteTokenizer())
    assert (tok.bkspc_token_id, tok.vocab_size) == (259, 260)
    assert check_bkspc_id(tok, 259) == 259
    assert ByteTokenizer().bkspc_token_id is None
    for bad, what in ((65, "byte"), (257, "eos"), (256, "bos"), (258, "pad")):
        with pytest.raises(ValueError, match=f"collides with (the )?{what}"):
            check_bkspc_id(tok, bad)
    with pytest.raises(ValueError, match="no <bkspc>"):
        check_bkspc_id(ByteTokenizer(), None)


def test_transformers_tokenizer_bkspc(tmp_path):
    from .checkpoint_fns import save_tiny_tokenizer

    tok = load_tokenizer(str(save_tiny_tokenizer(tmp_path / "tok")))
    n = tok.vocab_size
    add_bkspc(tok)
    assert tok.bkspc_token_id == n and tok.vocab_size == n + 1
    assert tok.encode("<bkspc>") == [n] and tok.decode([65, n]).startswith("b")
    tok.hf.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again.bkspc_token_id == n and again.vocab_size == n + 1
    with pytest.raises(ValueError, match="is the tokenizer's token"):
        check_bkspc_id(tok, 65)  # a real token
    with pytest.raises(ValueError, match="collides with the eos"):
        check_bkspc_id(tok, tok.eos_token_id)


@pytest.mark.parametrize("family,model_kwargs", [("hybrid", ALL_FIVE), ("llama", LLAMA)], ids=["hybrid", "llama"])
def test_model_rows_mean_initialised_and_saved(tmp_path, family, model_kwargs):
    from transformers import AutoModelForCausalLM

    model = backspace_fns._model(family, model_kwargs, "eager")
    emb = model.get_input_embeddings().weight.detach().clone()
    out = model.get_output_embeddings().weight.detach().clone()
    add_bkspc_rows(model, emb.shape[0] + 1)
    assert model.config.vocab_size == emb.shape[0] + 1
    torch.testing.assert_close(model.get_input_embeddings().weight[:-1], emb, rtol=0, atol=0)
    torch.testing.assert_close(model.get_input_embeddings().weight[-1], emb.mean(0), **EXACT)
    torch.testing.assert_close(model.get_output_embeddings().weight[-1], out.mean(0), **EXACT)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", torch_dtype=torch.float64)
    assert again.config.vocab_size == emb.shape[0] + 1
    torch.testing.assert_close(again.get_input_embeddings().weight, model.get_input_embeddings().weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="more than"):
        add_bkspc_rows(model, 3)


def test_sampled_trajectories_are_valid_model_trajectories():
    from hetsp.objectives.sequencematch import sample_trajectory

    model = backspace_fns._model("hybrid", ALL_FIVE, "eager")
    g = torch.Generator().manual_seed(0)  # near-uniform sampling: pops and ends happen within a few actions
    trajs = [sample_trajectory(model, [1, 2, 3], BK, EOS, 12, g, temperature=1e3) for _ in range(40)]
    assert any(BK in t for t in trajs) and any(t[-1] == EOS for t in trajs)
    for t in trajs:
        assert t.source == "model" and t.prompt_length == 3 and t[:3] == [1, 2, 3] and len(t) <= 15
        stack_structure(t, BK, VOCAB, prompt_length=3)  # pops never reach the prompt
    obj = _objective(gamma=0.9, chi2=0.5, w_data=0.5, alpha=1.0)
    structures = [stack_structure(t, BK, VOCAB, 3) for t in trajs[:3]]
    loss, _ = _one_process(_model(), trajs[:3], obj, structures)
    ref_loss, _ = backspace_fns.per_context_reference(trajs[:3], structures, "hybrid", ALL_FIVE, obj)
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), **PLAN_TOL)


def test_masked_sequence_refused():
    from hetsp.data.corpus import MaskedSequence

    with pytest.raises(NotImplementedError, match="prompt_length"):
        SequenceMatch.labels(MaskedSequence([1, 2, 3, 4], [False, True, False, True]))
    assert SequenceMatch.labels(Trajectory([1, 2, 3, 4], prompt_length=2)) == [-100, 3, 4, -100]
