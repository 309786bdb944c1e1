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
    assert max(g.size for mb in live_plan.micro_batches for g in mb.groups) == 2  # a sequence spans both ranks (and micro-batches with an idle rank)
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
