"""SequenceMatch with noise_source = "model": wrong tokens drawn from the current policy under
hetsp's plans (`hetsp.data.noise.draw_noise_from_model`) equal a one-process reference that runs
the plain model on each clean prefix and draws with the same u's (`inject_noise(...,
proposals=...)`, i.e. `_wrong_token`); and the training loop runs and resumes with it.

Exact equality of ids: fp64 models, so the logits under a plan differ from the reference's by
rounding (about 1e-15 relative) and a draw could flip only for a u within that distance of a
cumulative probability."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from hetsp.data.noise import draw_wrong_tokens, inject_noise

from . import backspace_fns, sm_noise_fns, sm_train_fns
from .test_sequencematch import LLAMA, _objective, _plans
from .test_sequencematch_train import sm_config
from .test_ssm_parallel import ALL_FIVE

BK = backspace_fns.BK  # 9: inside [0, NUM_REAL), so its exclusion is exercised
NUM_REAL = 40  # wrong tokens from ids [0, 40) of the 61-token test vocabulary
PROMPTS = (2, 0, 1, 0, 0)


def _clean():
    rng = random.Random(11)
    return [[rng.randrange(8) for _ in range(n)] for n in (14, 9, 6, 11, 4)]


def _noisy(proposals=None):
    """The batch as `NoisyData` builds it: one rng for the whole batch; the model's draws deferred
    (proposals None) or made now from `proposals` with the same rng (the same insertions and u's)."""
    rng = random.Random("7:noise:0")
    return [inject_noise(c, 0.4, rng, BK, NUM_REAL, pl, draw_later=proposals is None,
                         proposals=None if proposals is None else proposals[i])
            for i, (c, pl) in enumerate(zip(_clean(), PROMPTS))]


def _prefix_proposals(family, model_kwargs):
    """Per clean sequence, row j - 1: the plain model's last logits on the clean prefix x_<j."""
    model = backspace_fns._model(family, model_kwargs, "eager" if family == "hybrid" else "sdpa")
    out = []
    with torch.no_grad():
        for c in _clean():
            rows = torch.zeros(len(c), model.config.vocab_size, dtype=torch.float64)
            for j in range(1, len(c)):
                rows[j - 1] = model(input_ids=torch.tensor([c[:j]]), use_cache=False).logits[0, -1]
            out.append(rows)
    return out


@pytest.mark.parametrize("family,model_kwargs", [("hybrid", ALL_FIVE), ("llama", LLAMA)], ids=["hybrid-all-five", "llama"])
def test_model_draws_under_plans_equal_one_process(rank_pool, family, model_kwargs):
    batch = _noisy()
    assert sum(len(s.draws) for s in batch) >= 8
    lengths = [len(s) for s in batch]
    plans = _plans(lengths, random.Random(5))
    chosen = [plans[0], plans[4]]  # random groups and micro-batches; a group of 3 beside an idle rank
    assert chosen[0].to_json() != chosen[1].to_json()
    results = rank_pool(4).run(sm_noise_fns.draws_under_plans, batch, [p.to_json() for p in chosen], family, model_kwargs,
                               _objective(), NUM_REAL)
    want = _noisy(_prefix_proposals(family, model_kwargs))
    assert [len(s) for s in want] == lengths and [s.noise for s in want] == [s.noise for s in batch]
    for per_rank in results:  # every rank, every plan: the reference's ids exactly
        for got in per_rank:
            assert got == [list(s) for s in want]
    wrong = [(s[j], s[j + 2]) for s in want for j, n in enumerate(s.noise) if n]
    assert all(w != t and w != BK and 0 <= w < NUM_REAL for w, t in wrong), wrong
    assert len({w for w, _ in wrong}) > 2  # drawn from a spread distribution, not one fixed token


def test_draw_wrong_tokens_excludes_target_and_bkspc():
    logits = torch.zeros(3, 12, dtype=torch.float64)
    logits[:, BK] = 50.0  # <bkspc> and the target would take all the mass if not excluded
    logits[0, 4] = logits[1, 2] = 50.0
    logits[:, 11] = 80.0  # beyond num_real: never drawn
    logits[2, 5] = 30.0
    got = draw_wrong_tokens(logits, [4, 2, 5], [0.0, 0.999999, 0.5], 11, BK)
    assert got[0] == 0 and got[1] == 10  # uniform over the 9 others: u picks the first and the last
    assert got[2] not in (5, BK) and 0 <= got[2] < 11
    # u walks the cumulative probabilities: the same u gives the same token, a larger one a later token
    us = [k / 20 for k in range(20)]
    walk = draw_wrong_tokens(torch.randn(1, 12, dtype=torch.float64).expand(20, 12), [3] * 20, us, 11, BK)
    assert walk == sorted(walk) and 3 not in walk and BK not in walk


def test_deferred_placeholders_refused_by_the_loss():
    from hetsp.objectives.sequencematch import Trajectory

    batch = _noisy()
    traj = next(s for s in batch if s.draws)
    with pytest.raises(NotImplementedError, match="call SequenceMatch.step_batch"):
        _objective().token_inputs(traj)
    _objective().token_inputs(Trajectory(list(traj), traj.noise, traj.prompt_length))


def test_training_loop_with_model_noise_and_resume(rank_pool, tmp_path):
    pool = rank_pool(3)
    cfg = sm_config(tmp_path, "straight", steps=4, checkpoint_every=4)
    cfg["objective"].update(noise_source="model", bc_steps=1, sample_every=2)
    _, records, seen = [r for r in pool.run(sm_train_fns.run_train_noise, cfg, timeout=900) if r][0]
    steps = [r for r in records if r.get("kind") == "train"]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    for r in steps:
        assert 0.05 < r["noise_frac"] < 0.4  # p = 0.2 per target, a few hundred targets per step
        assert r["noise_draw_s"] > 0.0  # 0 on a step with nothing to draw
    assert [r["model_trajectories"] for r in steps] == [0, 3, 0, 3]
    wrong = [pair for pairs, _ in seen for pair in pairs]
    assert len(wrong) > 50 and not any(pending for _, pending in seen)
    assert all(w != t and w != 259 and 0 <= w < 256 for w, t in wrong), [p for p in wrong if p[0] == p[1]]

    resumed_cfg = copy.deepcopy(cfg)
    resumed_cfg["run"]["name"] = "resumed"
    start, resumed, seen2 = sm_train_fns.stop_and_resume(pool, sm_train_fns.run_train_noise, resumed_cfg, 2)
    assert start == 2
    # the same noise drawn by the same model, the same sums up to DeepSpeed's reduction order
    # (as tests/test_sequencematch_train.py; the run folder's records hold both parts)
    assert [r["loss"] for r in resumed if "loss" in r] == pytest.approx([r["loss"] for r in steps], rel=1e-6, abs=1e-7)
    n = len(seen2)  # the resumed part's batches: the same wrong tokens as the straight run's last steps
    assert n > 0 and [p for p, _ in seen2] == [p for p, _ in seen[-n:]]
