"""Cost models, bucketing, chunking, bounds and the simulator."""

import itertools
import json
import logging
import random

import pytest

import solver

from hetsp.config import ClusterConfig, ModelConfig, PlannerConfig
from hetsp.plan import Group, MicroBatch, Plan
from solver.bounds import lower_bound
from solver.bucketing import bucketize
from solver.chunking import min_max_chunks, min_micro_batches
from solver.costs import build_cost_model
from solver.costs.flexsp import FlexSPCostModel
from solver.costs.profile import ProfileCostModel, save_profile
from solver.costs.ring import RingCostModel
from solver.simulate import simulate

from .helpers import ToyCost


def test_flexsp_constants():
    cm = FlexSPCostModel("7b", 64, 30.0)
    assert cm.tokens_per_rank == 6449  # REFERENCE.md: "about 6,449 tokens"
    # group time in ms, as FlexSP's solver computes it
    s, d = 10_000, 8
    a2a = 4 * 2 * 32 * 4096 * s * 2 / 2**20 / d / 96.5
    assert cm.seq_time(s, d) * 1e3 == pytest.approx((5.128e-6 * s * s + 0.1839576 * s) / d + a2a)
    assert cm.seq_comm(s, 1) == 0.0 and cm.fixed_s == pytest.approx(0.62936)
    with pytest.raises(ValueError, match="unknown model"):
        FlexSPCostModel("70b", 64)


def _ring(**kw):
    model = ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336, vocab_size=128256)
    cluster = ClusterConfig(ranks_per_node=8, peak_tflops=989, intra_node_gbps=450, inter_node_gbps=50, **kw)
    return build_cost_model(PlannerConfig(cost_model="ring"), cluster, model, 64)


def test_ring_overlap_and_bounds():
    cm = _ring()
    assert isinstance(cm, RingCostModel)
    # long sequences hide the ring behind block compute; short ones on many ranks do not
    assert cm.seq_comm(131072, 8) == 0.0
    assert cm.seq_comm(1024, 64) > 0.0
    # packing sequences in a group can only hide more: the per-sequence sum is an upper bound
    rng = random.Random(0)
    for _ in range(50):
        ls = [rng.randint(1, 50_000) for _ in range(rng.randint(1, 6))]
        d = rng.choice([1, 2, 8, 16, 64])
        exact = cm.group_time(ls, d)
        bound = cm.group_overhead_s(d) + sum(cm.seq_time(s, d) for s in ls)
        assert exact <= bound * (1 + 1e-12)
        assert exact >= sum(cm.compute_s(s, d) for s in ls)
    no_peak = build_cost_model(PlannerConfig(cost_model="ring"), ClusterConfig(), ModelConfig(), 4)
    assert no_peak.capacity(2) == 2 * ClusterConfig().tokens_per_rank  # the memory budget needs no FLOP/s
    with pytest.raises(ValueError, match="peak_tflops"):
        no_peak.seq_time(100, 1)
    with pytest.raises(ValueError, match="model's shape"):
        build_cost_model(PlannerConfig(cost_model="ring"), ClusterConfig(peak_tflops=1), None, 4)


def test_ring_memory_from_gb():
    cm = _ring(memory_per_rank_gb=80.0)
    assert 1000 < cm.tokens_per_rank < 200_000
    assert cm.capacity(4) == 4 * cm.tokens_per_rank


def test_profile_interpolates(tmp_path):
    pts = [{"degree": d, "tokens": s, "time_s": (s * s * 1e-6 + s * 1e-3) / d} for d in (1, 4) for s in (1000, 2000, 4000)]
    data = {"format": "hetsp-profile-v1", "device": "X", "measured_at": "2026-01-01", "fixed_s": 0.1, "tokens_per_rank": 5000, "points": pts}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    cm = build_cost_model(PlannerConfig(cost_model="profile", profile_path=str(path)), ClusterConfig(), None, 4)
    assert isinstance(cm, ProfileCostModel)
    for p in pts:
        assert cm.seq_time(p["tokens"], p["degree"]) == pytest.approx(p["time_s"])
    assert cm.seq_time(1000, 1) < cm.seq_time(1500, 1) < cm.seq_time(2000, 1)
    # an unmeasured degree sits between its neighbours in rank-time
    assert 1 * cm.seq_time(2000, 1) >= 2 * cm.seq_time(2000, 2) >= 4 * cm.seq_time(2000, 4) - 1e-12
    assert cm.describe()["device"] == "X" and cm.fixed_s == 0.1
    saved = save_profile(tmp_path / "w.json", pts, 5000, 0.1, device="Y")
    again = ProfileCostModel.load(tmp_path / "w.json")
    assert again.seq_time(3000, 4) == pytest.approx(cm.seq_time(3000, 4)) and saved["measured_at"]
    with pytest.raises(ValueError, match="non-positive"):
        save_profile(tmp_path / "bad.json", [{"degree": 1, "tokens": 10, "time_s": 0}], 100)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ProfileCostModel.load(path)
    with pytest.raises(ValueError, match="not a hetsp profile"):
        ProfileCostModel({"points": []})


def test_profile_refuses_to_extrapolate_unless_allowed(tmp_path, caplog):
    pts = [{"degree": d, "tokens": s, "time_s": (s * s * 1e-6 + s * 1e-3) / d} for d in (1, 4) for s in (1000, 2000, 4000)]
    data = {"format": "hetsp-profile-v1", "fixed_s": 0.1, "tokens_per_rank": 5000, "points": pts}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    cm = build_cost_model(PlannerConfig(cost_model="profile", profile_path=str(path)), ClusterConfig(), None, 8)
    assert cm.seq_time(4000, 4) > 0 and cm.seq_time(500, 2) > 0  # measured, interpolated, below the shortest
    with pytest.raises(ValueError, match=r"8000 tokens on 1 rank\(s\) is beyond the longest measured \(4000\).*extrapolate = true"):
        cm.seq_time(8000, 1)
    with pytest.raises(ValueError, match=r"group size 8 is outside the measured ones \[1, 4\]"):
        cm.seq_time(1000, 8)
    # a planner on 8 ranks meets the unmeasured group sizes and refuses the same way
    planner = solver.get_planner("greedy", PlannerConfig(cost_model="profile", profile_path=str(path)), ClusterConfig())
    with pytest.raises(ValueError, match="outside the measured ones"):
        planner.plan([1000, 3000], 8)

    allowed = PlannerConfig(cost_model="profile", profile_path=str(path), options={"extrapolate": True})
    cm = build_cost_model(allowed, ClusterConfig(), None, 8)
    with caplog.at_level(logging.WARNING, logger="solver"):
        # beyond the last point: the quadratic through the last two is exact for this data
        assert cm.seq_time(8000, 1) == pytest.approx(8000 * 8000 * 1e-6 + 8.0)
        cm.seq_time(9000, 1)
        assert cm.seq_time(1000, 8) == pytest.approx(cm.seq_time(1000, 4) * 4 / 8)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said  # once per kind: length, group size
    assert "8000 tokens on 1 rank(s)" in said[0] and "a s + b s^2" in said[0]
    assert "group size 8" in said[1] and "nearest measured group size, 4" in said[1]


def _profile_file(tmp_path, **extra):
    pts = [{"degree": d, "tokens": s, "time_s": s * 1e-4 / d} for d in (1, 2) for s in (128, 1024, 2048 * d)]
    data = {"format": "hetsp-profile-v1", "fixed_s": 0.1, "tokens_per_rank": 1024, "points": pts, **extra}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return path


def test_profile_token_budget_is_the_clusters_and_group_overhead_is_paid_once(tmp_path):
    path = _profile_file(tmp_path, group_overhead_s={"1": 0.0, "2": 0.5})
    cm = build_cost_model(PlannerConfig(cost_model="profile", profile_path=str(path)), ClusterConfig(tokens_per_rank=2048), None, 2)
    # one truth for a rank's budget: cluster.tokens_per_rank, not the 1,024 the profile was measured with
    assert cm.capacity(1) == 2048 and cm.capacity(2) == 4096
    assert cm.group_overhead_s(2) == 0.5 and cm.group_overhead_s(1) == 0.0
    plan = Plan((1024, 1024, 1024), (MicroBatch((Group(0, 2, (0, 1, 2)),)),))
    # fixed + the group's overhead once + three sequences
    assert simulate(plan, cm).total_s == pytest.approx(0.1 + 0.5 + 3 * 1024 * 1e-4 / 2)
    old = _profile_file(tmp_path)  # no group_overhead_s: every group cost is in the points (0 overhead)
    assert build_cost_model(PlannerConfig(cost_model="profile", profile_path=str(old)), ClusterConfig(), None, 2).group_overhead_s(2) == 0.0


def test_profile_must_cover_the_configuration(tmp_path):
    from hetsp.checks import check_profile_covers
    from hetsp.config import ConfigError, config_from_dict

    path = _profile_file(tmp_path)
    cm = ProfileCostModel.load(path, ClusterConfig(tokens_per_rank=2048))
    assert cm.coverage_problems([1, 2], 4096) == []
    assert cm.coverage_problems([1, 2, 3], 2048) == ["group size 3 was not measured (measured: [1, 2])"]
    big = ProfileCostModel.load(path, ClusterConfig(tokens_per_rank=4096))
    assert big.coverage_problems([1, 2], 8192) == [
        "groups of 1 hold up to 4096 tokens but the profile measured up to 2048",
        "groups of 2 hold up to 8192 tokens but the profile measured up to 4096",
    ]
    cfg = config_from_dict({"data": {"max_seq_len": 8192}, "cluster": {"tokens_per_rank": 4096},
                            "planner": {"name": "milp", "cost_model": "profile", "profile_path": str(path)}})
    with pytest.raises(ConfigError, match=r"does not cover this configuration.*Re-measure it.*--profile"):
        check_profile_covers(cfg, 2)
    cfg.planner.options["extrapolate"] = True
    check_profile_covers(cfg, 2)  # explicitly allowed


def test_profile_records_and_compares_hardware(tmp_path):
    from solver.costs.profile import hardware_here

    here = hardware_here()
    assert here["cores"] >= 1 and here["torch"] and here["cpu"] and here["device"] == "cpu"
    pts = [{"degree": 1, "tokens": 128, "time_s": 0.01}]
    save_profile(tmp_path / "h.json", pts, 1024, 0.0, group_overhead_s={1: 0.0}, max_seq_len=128, hardware=here)
    cm = ProfileCostModel.load(tmp_path / "h.json")
    assert cm.hardware == here and cm.max_seq_len == 128
    assert cm.hardware_mismatch(here) is None
    other = dict(here, cpu="Some Other CPU", cores=here["cores"] + 6)
    note = cm.hardware_mismatch(other)
    assert "measured on other hardware" in note and "Some Other CPU" in note and "cores" in note
    assert "does not record the hardware" in ProfileCostModel.load(_profile_file(tmp_path)).hardware_mismatch(here)


def test_profile_shares_the_cores_among_the_busy_ranks(tmp_path):
    """A profile measured with 4 ranks on 2 cores: each size was measured with every rank busy (half a
    core each), so a micro-batch with fewer busy ranks runs faster than the table's time."""
    pts = [{"degree": d, "tokens": 100, "time_s": 1.0} for d in (1, 2, 4)]  # 1 s per 100 tokens, half a core
    cpu = {"cpu": "X", "cores": 2, "torch": "2", "device": "cpu"}
    save_profile(tmp_path / "p.json", pts, 1000, 0.1, hardware=cpu, world=4)
    cm = ProfileCostModel.load(tmp_path / "p.json")
    assert cm.world == 4 and cm.shared_cores == 2 and cm.core_share(1) == cm.core_share(4) == 0.5
    # hand-computed: time with a core per rank = table time x 0.5; busy ranks share 2 cores
    one = [(1, [100])]  # one busy rank: a whole core, 0.5 s
    assert cm.micro_batch_time(one) == pytest.approx(0.1 + 0.5)
    four = [(1, [100])] * 4  # as measured: 4 busy ranks, half a core each
    assert cm.micro_batch_time(four) == pytest.approx(0.1 + 1.0)
    # 3 busy ranks (2/3 of a core each) until the group of 1 is done (0.25 / (2/3) = 0.375 s), then the
    # group of 2 alone (0.25 s of work left at a whole core)
    mixed = [(2, [100]), (1, [50])]
    assert cm.micro_batch_time(mixed) == pytest.approx(0.1 + 0.375 + 0.25)
    plan = Plan((100, 50), (MicroBatch((Group(0, 2, (0,)), Group(2, 1, (1,)))),))
    assert simulate(plan, cm).total_s == pytest.approx(0.1 + 0.375 + 0.25)  # the predicted step time
    # the planners' table keeps the slowest group's time as measured
    assert cm.group_time([100], 2) == pytest.approx(1.0)
    # one rank per core or device, or no world recorded: the slowest group, as before
    for hardware, world in ((cpu, None), (dict(cpu, device="NVIDIA H100"), 4), (dict(cpu, cores=4), 4)):
        save_profile(tmp_path / "q.json", pts, 1000, 0.1, hardware=hardware, world=world)
        other = ProfileCostModel.load(tmp_path / "q.json")
        assert other.shared_cores is None and other.micro_batch_time(one) == pytest.approx(0.1 + 1.0)
        assert other.micro_batch_time(mixed) == pytest.approx(0.1 + 1.0)
    with pytest.raises(ValueError, match="'world' must be a positive integer"):
        ProfileCostModel(dict(json.loads((tmp_path / "p.json").read_text()), world=0))


def test_bucketize_is_optimal():
    rng = random.Random(1)
    for _ in range(20):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 9))]
        q = rng.randint(1, 4)
        got = bucketize(lengths, q)
        values = sorted(set(lengths))
        best = float("inf")
        for k in range(1, min(q, len(values)) + 1):
            for cuts in itertools.combinations(values[:-1], k - 1):
                bounds = list(cuts) + [values[-1]]
                pad = sum(min(b for b in bounds if b >= s) - s for s in lengths)
                best = min(best, pad)
        assert got.padding == pytest.approx(best)
        assert sorted(i for m in got.members for i in m) == list(range(len(lengths)))
        for b, m in zip(got.bounds, got.members):
            assert all(lengths[i] <= b for i in m)


def test_min_max_chunks_is_optimal():
    rng = random.Random(2)
    for _ in range(30):
        w = [rng.randint(1, 20) for _ in range(rng.randint(1, 8))]
        k = rng.randint(1, 4)
        got = min_max_chunks(w, k)
        assert got[0][0] == 0 and got[-1][1] == len(w) and len(got) <= k
        best = min(
            max(sum(w[a:b]) for a, b in zip((0,) + c, c + (len(w),)))
            for r in range(0, min(k, len(w)))
            for c in itertools.combinations(range(1, len(w)), r)
        )
        assert max(sum(w[a:b]) for a, b in got) == pytest.approx(best)
    assert min_max_chunks([1, 1], 1, tokens=[5, 5], max_tokens=6) is None
    assert min_micro_batches([10, 10, 5], 10) == 3


def test_simulator_and_bound():
    cm = ToyCost(a=0.0, b=1.0, c=0.0, k=100, f=0.5)
    plan = Plan((10, 20, 30), (MicroBatch((Group(0, 1, (0, 1)), Group(1, 1, (2,)))), MicroBatch((Group(0, 2, ()),))))
    sim = simulate(plan, cm, 2)
    assert sim.total_s == pytest.approx(0.5 + 30.0 + 0.5)  # an empty micro-batch still runs: its fixed cost
    assert sim.idle_rank_s == pytest.approx(0.0)
    lb = lower_bound([10, 20, 30], cm, [1, 2], 2)
    assert lb.total_s == pytest.approx(30.0 + 0.5)
    assert lb.total_s <= sim.total_s
