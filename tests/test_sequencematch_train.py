"""SequenceMatch through the training loop (`train.objective = "sequencematch"`) on 3 gloo ranks:
a checkpoint without `<bkspc>` grows its row, noise and structures reach the executor, the
schedule switches from behaviour cloning, model-generated trajectories join the batch every N
steps, the run resumes exactly, and its export reloads with `<bkspc>`."""

import json
import math
import random
from pathlib import Path

import pytest

from . import sm_train_fns
from .test_ssm_parallel import _hybrid

BK = 259  # the byte tokenizer's <bkspc>
PARTS = ("sm_ml", "sm_reward", "sm_chi2", "sm_value_data", "sm_value_model")


def _start_model(folder: Path) -> Path:
    """A tiny hybrid model (attention and Mamba-2) saved with the byte vocabulary, no <bkspc> row."""
    import torch

    from hetsp.config import ModelConfig
    from hetsp.model_registry import build_model

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        build_model(ModelConfig(family="hybrid", **_hybrid("attention,mamba2")), 259).save_pretrained(folder)
    return folder


def sm_config(tmp_path: Path, name: str, **train):
    docs = tmp_path / "docs.jsonl"
    if not docs.exists():
        rng = random.Random(0)
        words = ["alpha", "beta", "gamma", "ring", "plan", "rank"]
        with docs.open("w") as f:
            for _ in range(40):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.choice([3, 8, 16])))}) + "\n")
    cfg = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 3},
        "model": {"init_from": str(_start_model(tmp_path / "start"))},
        "data": {"dataset": str(docs), "tokenizer": "bytes", "max_seq_len": 96, "tokens_per_batch": 300,
                 "validation_fraction": 0.1},
        "cluster": {"tokens_per_rank": 256},
        "planner": {"name": "random"},
        "train": {"steps": 5, "lr": 3e-3, "warmup_steps": 0, "eval_every": 0, "checkpoint_every": 5,
                  "zero_stage": 1, "objective": "sequencematch"},
        "objective": {"noise_p": 0.2, "bc_steps": 2, "alpha": 0.5, "w_data": 0.5, "chi2": 0.5, "gamma": 0.99,
                      "sample_every": 2, "samples_per_round": 3, "sample_prompt_tokens": 6,
                      "sample_max_new_tokens": 5, "sample_temperature": 3.0},
    }
    cfg["train"].update(train)
    return cfg


def test_sequencematch_training_loop_resume_and_export(rank_pool, tmp_path):
    pool = rank_pool(3)
    straight = sm_config(tmp_path, "straight")
    _, records, seen = [r for r in pool.run(sm_train_fns.run_train_recording, straight, timeout=900) if r][0]
    steps = [r for r in records if r.get("kind") == "train"]
    assert len(steps) == 5 and all(math.isfinite(r["loss"]) for r in steps)
    # behaviour cloning for bc_steps = 2, then alpha; samples at steps 2 and 4 (every 2 from the switch)
    assert [r["sm_weight"] for r in steps] == [0.0, 0.0, 0.5, 0.5, 0.5]
    assert [r["model_trajectories"] for r in steps] == [0, 0, 3, 0, 3]
    assert [m for _, _, m in seen] == [0, 0, 3, 0, 3]
    for r in steps:
        # the logged terms add up to the step loss: the same fp32 token terms summed in another order
        # (a few hundred tokens per rank: fp32 rounding, rel 1e-5)
        assert sum(r[k] for k in PARTS) == pytest.approx(r["loss"], rel=1e-5, abs=1e-6)
        assert 0.05 < r["noise_frac"] < 0.4  # p = 0.2 per target, a few hundred targets per step
        if r["sm_weight"] == 0:
            assert r["sm_reward"] == r["sm_chi2"] == r["sm_value_data"] == 0.0
        else:
            assert r["sm_value_data"] != 0.0 and r["sm_chi2"] > 0.0
    assert steps[2]["sm_value_model"] != 0.0
    # every <bkspc> of every batch reached the executor as a pop of a stack structure
    assert all(n_bk > 0 and n_bk == n_pops for n_bk, n_pops, _ in seen), seen

    # stop after 3 steps, resume: the same noise, samples and losses
    start, resumed, _ = sm_train_fns.stop_and_resume(pool, sm_train_fns.run_train_recording,
                                                     sm_config(tmp_path, "resumed"), 3)
    assert start == 3
    # the same sums in the same order up to DeepSpeed's reduction order (as tests/test_train_loop.py)
    assert [r["loss"] for r in resumed if "loss" in r] == pytest.approx([r["loss"] for r in steps], rel=1e-6, abs=1e-7)

    # the export has the <bkspc> row and id, and reloads
    import torch
    from transformers import AutoModelForCausalLM

    import models  # noqa: F401  registers the hybrid family
    from hetsp.export import export

    out = export(tmp_path / "runs" / "straight" / "checkpoints", tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 260 and config["bkspc_token_id"] == BK
    assert json.loads((out / "hetsp_export.json").read_text())["bkspc_token_id"] == BK
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == 260
    # a SequenceMatch run starting from the export keeps its rows (nothing to add); the start model gets one
    from hetsp.data.tokenizer import ByteTokenizer
    from hetsp.objectives.sequencematch import bkspc_vocab_size

    assert bkspc_vocab_size(ByteTokenizer(bkspc=True), model.config.vocab_size) is None
    assert bkspc_vocab_size(ByteTokenizer(bkspc=True), 259) == 260
    assert bkspc_vocab_size(ByteTokenizer(), 259) is None


def test_export_tokenizer_gets_bkspc(tmp_path):
    """A transformers tokenizer is copied into the export with <bkspc> as a special token."""
    from hetsp.data.tokenizer import load_tokenizer
    from hetsp.export import _export_tokenizer

    from .checkpoint_fns import save_tiny_tokenizer

    src = save_tiny_tokenizer(tmp_path / "tok")
    n = load_tokenizer(str(src)).vocab_size
    _export_tokenizer(str(src), tmp_path / "out", bkspc=True)
    again = load_tokenizer(str(tmp_path / "out"))
    assert again.bkspc_token_id == n and again.vocab_size == n + 1
    _export_tokenizer(str(src), tmp_path / "plain")
    assert load_tokenizer(str(tmp_path / "plain")).bkspc_token_id is None


def test_config_section_checked_at_load(tmp_path):
    from hetsp.config import ConfigError, config_from_dict

    base = {"train": {"objective": "sequencematch"}}
    cfg = config_from_dict({**base, "objective": {"gamma": 0.9, "sample_every": 2}})
    assert cfg.objective.gamma == 0.9 and cfg.objective.sample_every == 2
    for bad, match in (({"gamma": 0.0}, "gamma"), ({"noise_p": 1.0}, "noise_p"), ({"gama": 0.9}, "unknown key"),
                       ({"noise_source": "other"}, "noise_source"), ({"sample_every": -1}, "sample_every")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**base, "objective": bad})


def test_run_refuses_what_it_cannot_do(tmp_path):
    """Settings the training loop would accept and not use are refused: the value
    term's model half without sampling, model noise without noise, sampled trajectories that would
    carry no weight (when the training loop builds its data)."""
    from hetsp.config import config_from_dict
    from hetsp.objectives import get_objective

    base = sm_config(tmp_path, "x")
    for bad, match in (({"w_data": 0.5, "sample_every": 0}, "sample_every = 0 samples none"),
                       ({"noise_source": "model", "noise_p": 0.0}, "noise_p = 0 injects none"),
                       ({"alpha": 0.0}, "no weight"),
                       ({"chi2": 0.0, "w_data": 1.0}, "no weight")):
        section = config_from_dict({**base, "objective": {**base["objective"], **bad}}).objective
        with pytest.raises(ValueError, match=match):
            get_objective("sequencematch", section).build_data(config_from_dict(base), 0)


def test_lockstep_sampler_matches_the_cached_decoder():
    """The training loop's sampler (contexts recomputed through hetsp's packed forward) draws the same
    actions as `sample_trajectory` (models.backspace_decoding with its cache) from the same generator:
    the logits at every action are the same up to fp64 rounding."""
    import torch

    from hetsp.attention import register_attention
    from hetsp.objectives.sequencematch import sample_trajectory
    from hetsp.objectives.sm_sampling import sample_backspace_in_lockstep
    from hetsp.ssm_parallel import parallelize

    from .backspace_fns import BK as TEST_BK, _model
    from .test_sequencematch import EOS

    kinds = _hybrid("attention,mamba2")
    ring = parallelize(_model("hybrid", kinds, register_attention()))
    eager = _model("hybrid", kinds, "eager")
    favour = torch.zeros(ring.config.vocab_size, dtype=torch.float64)
    favour[TEST_BK] = 3.0  # the random model's logits are near 0: <bkspc> gets about 1/4 of the mass
    for m in (ring, eager):
        m.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out + favour)
    # several prompts in one packed forward per round
    got = sample_backspace_in_lockstep(ring, [[1, 2, 3], [4, 5], [6]], 6, torch.Generator().manual_seed(5), TEST_BK,
                                       EOS, kernel="torch_cpu")
    assert all(1 <= len(a) <= 6 for a in got)
    # one prompt at a time: the same draws as the cached decoder from the same generator
    compared = []
    for seed in range(3):
        p = [1 + seed, 2, 3]
        want = sample_trajectory(eager, p, TEST_BK, EOS, 8, torch.Generator().manual_seed(seed))
        mine = sample_backspace_in_lockstep(ring, [p], 8, torch.Generator().manual_seed(seed), TEST_BK, EOS,
                                            kernel="torch_cpu")[0]
        assert list(want) == p + mine
        compared.append(mine)
    assert sum(a.count(TEST_BK) for a in compared) >= 2  # pops happen (seeded), and are drawn alike
