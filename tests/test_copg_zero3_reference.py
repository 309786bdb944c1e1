"""The live CoPG reference under ZeRO-3: a partitioned frozen copy of the starting policy.

On 2 gloo ranks, fp32 (ZeRO-3 partitions only fp16, bf16 and fp32): live reference log-probs
from the copy equal the ones precomputed from the policy and one process, for the stock Llama
and the hybrid model with all five mixer kinds; the KL estimate before any update is 0; each rank
stores only its partition of the copy; a training run with the live reference resumes exactly.
"""

import random

import pytest
import torch

from hetsp.config import ClusterConfig, PlannerConfig
from hetsp.objectives.copg import CoPG
from solver import get_planner

from . import copg_zero3_fns, step_fns
from .test_copg import completion_logp, random_bundles
from .test_ssm_parallel import ALL_FIVE

# fp32: the plans (ring attention, SSM state passing over groups of 1 and 2 ranks) change only
# the summation order; sums of up to ~25 log-probs of size ~4 round at a few 1e-6 relative
FP32_TOL = dict(rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "hybrid"])
def test_live_reference_under_zero3_equals_precomputed_and_one_process(rank_pool, tmp_path, family):
    kwargs = ALL_FIVE if family == "hybrid" else None
    rng = random.Random(21)
    exs = random_bundles(rng, 4, ref=False)
    bundles = CoPG().bundles(exs)
    batches = [sorted(s for b in bundles[:2] for s in b), sorted(s for b in bundles[2:] for s in b)]
    live_plan = get_planner("random", PlannerConfig(seed=1), ClusterConfig()).plan([len(e.tokens) for e in exs], 2, bundles)
    sizes = [[g.size for g in mb.groups] for mb in live_plan.micro_batches]
    assert [2] in sizes and [1] in sizes  # a sequence over both ranks; a micro-batch with an idle rank
    out = rank_pool(2).run(copg_zero3_fns.live_reference_zero3, exs, batches, 7, live_plan.to_json(), str(tmp_path),
                           family, kwargs)
    model = copg_zero3_fns.policy_model(family, kwargs, "sdpa")
    with torch.no_grad():
        want = torch.tensor([float(completion_logp(model, e)) for e in exs], dtype=torch.float64)
    full = sum(p.numel() for p in model.parameters())
    stored = 0
    for pre, live, kl, after, kl_after, sizes in out:
        torch.testing.assert_close(torch.tensor(pre, dtype=torch.float64), want, **FP32_TOL)
        torch.testing.assert_close(torch.tensor(live, dtype=torch.float64), want, **FP32_TOL)
        # policy and copy run the same plan on the same parameters: bit for bit the same sums
        assert kl == 0.0
        assert after == live  # the copy stays the starting policy while the policy trains
        assert abs(kl_after) > 1e-6  # ... and the policy moved away from it
        (copy_part, copy_full), (policy_part, policy_full) = sizes["copy"], sizes["policy"]
        assert copy_full == policy_full == full
        assert copy_part == policy_part  # the copy is partitioned exactly like the policy
        assert copy_part <= full // 2 + len(list(model.parameters()))  # half of each parameter, rounded up
        assert sizes["copy_gathered"] == 0 and sizes["policy_gathered"] == 0  # released after each forward
        stored += copy_part
    assert full <= stored  # the two partitions cover the whole copy


@pytest.mark.parametrize("origin", ["scratch", "checkpoint", "hybrid"])
def test_offline_copg_under_zero3_with_live_reference_resumes_exactly(rank_pool, tmp_path, origin):
    """The training loop under ZeRO-3 with reference = "live", from a random initialisation (the tiny
    Llama, and the hybrid model with all five mixer kinds, every sequence over both ranks) and from a
    checkpoint (`model.init_from`, loaded with zero.Init): the KL estimate at step 0 is 0, and a run
    stopped after 2 steps and resumed (the copy is taken again from the starting policy, before the
    checkpoint is loaded) gives the losses of the straight run."""
    from . import checkpoint_fns, train_fns
    from .test_copg_train import copg_config

    def config(name):
        cfg = copg_config(tmp_path, name, reference="live")
        cfg["train"].update(zero_stage=3, dtype="fp32")
        if origin == "checkpoint":
            folder = tmp_path / "tiny"
            if not folder.exists():
                checkpoint_fns.save_tiny_llama(folder)
                checkpoint_fns.save_tiny_tokenizer(folder)
            cfg["model"] = {"init_from": str(folder)}
            cfg["data"] = {"tokenizer": "model"}
        if origin == "hybrid":
            cfg["model"] = dict(ALL_FIVE, family="hybrid", max_position_embeddings=512)
            cfg["planner"] = {"name": "static", "group_size": 2}  # the SSM state passes between the ranks
        return cfg

    pool = rank_pool(2)
    _, full = [r for r in pool.run(train_fns.run_train, config("straight")) if r][0]
    steps = [r for r in full if r.get("kind", "train") == "train" and "loss" in r]
    assert len(steps) == 4
    assert steps[0]["kl"] == 0.0  # policy and its copy: the same parameters under the same plan
    assert abs(steps[-1]["kl"]) > 0.0  # the policy moved, the copy did not
    first = config("resumed")
    first["train"]["stop_after"] = 2
    pool.run(train_fns.run_train, first)
    start, resumed = [r for r in pool.run(train_fns.run_train, config("resumed"), True) if r][0]
    assert start == 2
    losses = [r["loss"] for r in resumed if "loss" in r]
    # fp32, and resuming restores the same state: the same sums in the same order
    assert losses == pytest.approx([r["loss"] for r in steps], rel=1e-6, abs=1e-7)
