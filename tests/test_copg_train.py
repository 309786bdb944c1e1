"""Offline CoPG through the training loop: bundles planned together, reference cached and reused
on resume, alignment metrics in metrics.jsonl."""

import json
import random
from pathlib import Path

import pytest

from hetsp.plan import Plan

from . import train_fns


def copg_config(tmp_path: Path, name: str, **objective):
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.exists():
        rng = random.Random(0)
        words = ["def", "return", "x", "y", "(", ")", ":", "if", "else", "for"]
        with pairs.open("w") as f:
            for i in range(12):
                prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
                if i % 3:
                    row = {"prompt": prompt, "chosen": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))),
                           "rejected": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))}
                else:
                    comps = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(3)]
                    row = {"prompt": prompt, "completions": comps, "rewards": [rng.uniform(-1, 1) for _ in comps]}
                f.write(json.dumps(row) + "\n")
    return {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 3},
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64,
                  "max_position_embeddings": 512},
        "cluster": {"tokens_per_rank": 256},
        "planner": {"name": "random"},
        "train": {"steps": 4, "lr": 1e-3, "warmup_steps": 0, "eval_every": 0, "checkpoint_every": 0,
                  "zero_stage": 2, "objective": "copg"},
        "objective": {"data": str(pairs), "bundles_per_batch": 3, "beta": 0.2, **objective},
    }


def test_offline_copg_trains_with_bundles_and_reuses_the_reference_on_resume(rank_pool, tmp_path):
    pool = rank_pool(2)
    straight = copg_config(tmp_path, "straight")
    _, full = [r for r in pool.run(train_fns.run_train, straight) if r][0]
    steps = [r for r in full if r.get("kind", "train") == "train" and "loss" in r]
    assert len(steps) == 4
    for r in steps:
        for key in ("reward_chosen", "reward_rejected", "margin", "pair_loss", "kl", "order_acc"):
            assert key in r, key
        assert r["loss"] == pytest.approx(r["pair_loss"], rel=1e-9)  # the step loss is the mean bundle loss
    # step 0: the policy is the reference, so every log-ratio is 0 up to rounding
    assert abs(steps[0]["kl"]) < 1e-5 and abs(steps[0]["margin"]) < 1e-5
    run = tmp_path / "runs" / "straight"
    plans = [Plan.from_dict(json.loads(line)["plan"]) for line in (run / "plans.jsonl").read_text().splitlines()]
    assert all(p.bundles for p in plans)
    for p in plans:
        p.validate(2)
    assert len(list((run / "reference").glob("*.json"))) == 1

    first = copg_config(tmp_path, "resumed")
    first["train"]["stop_after"] = 2
    pool.run(train_fns.run_train, first)
    ref_file = next((tmp_path / "runs" / "resumed" / "reference").glob("*.json"))
    stamp = ref_file.stat().st_mtime_ns
    second = copg_config(tmp_path, "resumed")
    start, resumed = [r for r in pool.run(train_fns.run_train, second, True) if r][0]
    assert start == 2
    assert ref_file.stat().st_mtime_ns == stamp  # read from the cache, not recomputed
    losses = [r["loss"] for r in resumed if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in steps], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("decoding", ["sample", "diverse_beam"])
def test_online_copg_samples_from_the_policy_every_n_steps(rank_pool, tmp_path, decoding):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def f(x):", "def g(a, b):", "x = 1", "if y:"]))
    cfg = copg_config(tmp_path, "online", data=str(prompts), online_every=2, samples_per_prompt=2, max_new_tokens=5,
                      reward_fn="tests.copg_fns:length_reward", reference="live", bundles_per_batch=2,
                      decoding=decoding)
    _, records = [r for r in rank_pool(2).run(train_fns.run_train, cfg) if r][0]
    steps = [r for r in records if r.get("kind", "train") == "train" and "loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert r["loss"] == pytest.approx(r["pair_loss"], rel=1e-9)
        assert 0.0 <= r["reward_rejected"] <= r["reward_chosen"] <= 0.5  # at most 5 sampled bytes, scored by length
    # step 0 samples from the starting policy, which is the reference: every log-ratio is 0
    assert abs(steps[0]["kl"]) < 1e-5 and abs(steps[0]["margin"]) < 1e-5
    plans = [Plan.from_dict(json.loads(line)["plan"]) for line in (tmp_path / "runs" / "online" / "plans.jsonl").read_text().splitlines()]
    assert len(plans) == 4 and all(len(p.bundles) == 2 and all(len(b) == 2 for b in p.bundles) for p in plans)


def test_online_copg_config_is_checked():
    from hetsp.config import ConfigError, config_from_dict

    base = {"train": {"objective": "copg"}, "objective": {"data": "p.jsonl", "online_every": 2}}
    with pytest.raises(ConfigError, match="reward_fn"):
        config_from_dict(base)
    base["objective"]["reward_fn"] = "m:f"
    with pytest.raises(ConfigError, match="reference = 'live'"):
        config_from_dict(base)
    base["objective"]["reference"] = "live"
    config_from_dict(base)
    with pytest.raises(ConfigError, match="diversity applies to decoding = 'diverse_beam'"):
        config_from_dict({**base, "objective": {**base["objective"], "diversity": 1.0}})
    dbs = {**base["objective"], "decoding": "diverse_beam", "diversity": 1.0}
    config_from_dict({**base, "objective": dbs})
    with pytest.raises(ConfigError, match="Diverse Beam Search is deterministic"):
        config_from_dict({**base, "objective": {**dbs, "temperature": 0.7}})
    config_from_dict({**base, "objective": {**dbs, "temperature": 0.7, "eval_prompts": 2}})  # held-out sampling uses it
    with pytest.raises(ConfigError, match="diversity must be >= 0"):
        config_from_dict({**base, "objective": {**dbs, "diversity": -0.1}})
    with pytest.raises(ConfigError, match="online_every > 0"):
        config_from_dict({**base, "objective": {**dbs, "online_every": 0}})


def test_diverse_beam_completions_are_each_groups_best_beam():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetsp.generation.diverse_beam import diverse_beam_search
    from hetsp.objectives.online import diverse_beam_completions

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    prompts = [[1, 5, 7], [2, 3]]
    comps = diverse_beam_completions(model, prompts, 3, 2.0, 4, None, "cpu", "auto")
    for p, cs in zip(prompts, comps):
        groups = diverse_beam_search(model, p, 3, 3, 2.0, 4, None, "cpu", "auto")
        assert cs == [g[0].tokens for g in groups] and all(len(c) == 4 for c in cs)


def test_online_copg_with_diverse_beam_rounds_under_zero3(rank_pool, tmp_path, one_thread):
    """Online CoPG with Diverse Beam Search rounds under ZeRO-3 (LoRA, live reference = its base)
    on 3 ranks: a round of 2 prompts leaves one rank without a prompt, so the ranks' forward
    counts differ unless they decode in lockstep (a hang otherwise, caught by the pool's timeout).
    Every round's completions equal Diverse Beam Search of each prompt in one process with the
    policy's parameters of that moment (gathered), bit for bit; held-out evaluation still samples."""
    import torch

    from hetsp.generation.diverse_beam import diverse_beam_search

    from . import copg_fns
    from .checkpoint_fns import plain_model, save_tiny_llama

    k, max_new, diversity, eos = 2, 4, 0.5, 257  # eos: the byte tokenizer's
    cfg = copg_config(tmp_path, "dbs_zero3", data="", online_every=1, samples_per_prompt=k, max_new_tokens=max_new,
                      reward_fn="tests.copg_fns:char_sum_reward", reference="live", bundles_per_batch=2,
                      max_prompt_tokens=200, eval_prompts=2, decoding="diverse_beam", diversity=diversity)
    cfg["data"] = {"dataset": "funcbody", "format": "prompt_completion", "max_documents": 40,
                   "validation_fraction": 0.25}
    cfg["model"] = {"init_from": str(save_tiny_llama(tmp_path / "start", vocab_size=259, max_position_embeddings=128))}
    cfg["lora"] = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    cfg["train"].update(steps=3, zero_stage=3, dtype="fp32", lr=1e-2)
    records, calls = [r for r in rank_pool(3).run(copg_fns.run_train_recording_rounds, cfg, timeout=600) if r][0]
    steps = [r for r in records if r.get("kind", "train") == "train" and "loss" in r]
    assert len(steps) == 3
    assert [r["heldout_completions"] for r in records if r.get("kind") == "heldout"] == [4.0, 4.0]
    assert [c[0] for c in calls] == ["sample", "diverse_beam", "diverse_beam", "diverse_beam", "sample"]

    # the run's model (LoRA included) built in this process: loaded as ZeRO 1 loads it (ZeRO-3 would
    # partition it while loading); its parameters are then set to each round's gathered ones
    model = plain_model({**cfg, "train": {**cfg["train"], "zero_stage": 1}}, torch.float32, attn="sdpa").eval()
    named = dict(model.named_parameters())
    moved = 0
    for decoding, params, scored in calls[1:-1]:
        assert set(params) == set(named)
        with torch.no_grad():
            for n, value in params.items():
                named[n].copy_(value)
        moved += any("lora_B" in n and v.abs().max() > 0 for n, v in params.items())
        bundles = sorted({b for _, _, b in scored})
        assert bundles == [0, 1]
        for b in bundles:
            mine = [(tokens, n) for tokens, n, bb in scored if bb == b]
            prompt = list(mine[0][0][: mine[0][1]])
            want = [g[0].tokens for g in diverse_beam_search(model, prompt, k, k, diversity, max_new, eos)]
            assert [list(t[n:]) for t, n in mine] == want
    assert moved == 2  # rounds 1 and 2 decode an updated policy (LoRA B starts at zero)


def test_online_prompts_from_the_finetuning_dataset():
    from hetsp.config import config_from_dict
    from hetsp.objectives.online import online_prompts

    cfg = config_from_dict({
        "data": {"dataset": "funcbody", "format": "prompt_completion", "max_documents": 30, "add_bos": True},
        "train": {"objective": "copg"},
        "objective": {"online_every": 2, "bundles_per_batch": 3, "reward_fn": "m:f", "reference": "live"},
    })
    data = online_prompts(cfg, cfg.objective, 0)
    assert data.per_round == 6 and len(data.prompts) == len(data.texts) > 6
    for ids, text in zip(data.prompts, data.texts):
        assert ids[0] == data.tokenizer.bos_token_id and data.tokenizer.decode(ids[1:]) == text
        assert text.lstrip().startswith(("def ", "async def ", "@"))
    n = len(data.prompts)
    seen = [p for rnd in range(-(-n // 6)) for p in data.round_prompts(rnd)][:n]
    assert sorted(seen) == list(range(n))  # one pass covers every prompt once


def test_online_copg_on_the_funcbody_task_with_its_reward(rank_pool, tmp_path):
    """The path of configs/copg_stdlib.toml on a tiny random model: the task's prompts, the graded
    standard-library reward, a live reference."""
    cfg = copg_config(tmp_path, "funcbody", data="", online_every=1, samples_per_prompt=2, max_new_tokens=4,
                      reward_fn="hetsp.rewards.funcbody:funcbody_reward", reference="live", bundles_per_batch=2,
                      max_prompt_tokens=200)
    cfg["data"] = {"dataset": "funcbody", "format": "prompt_completion", "max_documents": 30}
    cfg["train"]["steps"] = 2
    _, records = [r for r in rank_pool(2).run(train_fns.run_train, cfg) if r][0]
    steps = [r for r in records if r.get("kind", "train") == "train" and "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert 0.0 <= r["reward_rejected"] <= r["reward_chosen"] <= 1.0  # the reward lies in [0, 1]
        assert r["loss"] == pytest.approx(r["pair_loss"], rel=1e-9)


def test_online_copg_raises_a_learnable_reward_on_heldout_prompts(rank_pool, tmp_path):
    """End to end, online CoPG must improve what it is rewarded for: with a reward a tiny random
    byte model can learn (the fraction of ASCII characters, about 0.5 at the start), 20 steps of
    16 sampled completions raise the held-out reward. A mismatch anywhere between completions,
    their rewards and their log-probs (ranks, bundles, the gather of a sampling round) would leave
    it flat or lower it. Measured: 0.517 -> 0.710 (beta 0.02, which lets the optimum tilt each
    byte's odds by about e^6; 16 held-out completions, so the margin asked is well above noise)."""
    cfg = copg_config(tmp_path, "learns", data="", online_every=1, samples_per_prompt=4, max_new_tokens=8,
                      reward_fn="tests.copg_fns:ascii_fraction_reward", reference="live", bundles_per_batch=4,
                      max_prompt_tokens=200, eval_prompts=4, beta=0.02)
    cfg["data"] = {"dataset": "funcbody", "format": "prompt_completion", "max_documents": 40,
                   "validation_fraction": 0.25}
    cfg["train"].update(steps=20, lr=1e-2)
    _, records = [r for r in rank_pool(2).run(train_fns.run_train, cfg) if r][0]
    before, after = [r["heldout_reward"] for r in records if r.get("kind") == "heldout"]
    assert after > before + 0.1


def test_heldout_evaluation_of_online_copg_on_the_hybrid_model(rank_pool, tmp_path):
    """configs/copg_stdlib.toml's path on a tiny hybrid model (all five mixer kinds, live frozen
    copy as reference): held-out prompts are sampled before the first update and after the last;
    before, the policy is its reference, so the KL estimate is exactly 0 (groups of 2 ranks: a copy
    whose SSM kernels acted on the policy's layers would differ)."""
    # a reward that differs between the samples of a bundle, so the updates move the policy
    cfg = copg_config(tmp_path, "heldout", data="", online_every=1, samples_per_prompt=2, max_new_tokens=4,
                      reward_fn="tests.copg_fns:char_sum_reward", reference="live", bundles_per_batch=2,
                      max_prompt_tokens=200, eval_prompts=2)
    cfg["data"] = {"dataset": "funcbody", "format": "prompt_completion", "max_documents": 40,
                   "validation_fraction": 0.25}
    cfg["model"] = {"family": "hybrid", "hidden_size": 32, "num_layers": 5, "num_heads": 4, "num_kv_heads": 2,
                    "intermediate_size": 48, "max_position_embeddings": 512,
                    "extra": {"layer_pattern": "attention,s4d,ema,mamba2,seqboat", "s4d_state_size": 8, "ema_dim": 4,
                              "mamba_d_state": 8, "mamba_head_dim": 16, "mamba_chunk_size": 4, "seqboat_window": 3,
                              "seqboat_z_dim": 8, "seqboat_v_dim": 16}}
    cfg["planner"] = {"name": "static", "group_size": 2}  # every sequence spread over both ranks
    cfg["train"]["steps"] = 2
    _, records = [r for r in rank_pool(2).run(train_fns.run_train, cfg) if r][0]
    held = [r for r in records if r.get("kind") == "heldout"]
    assert [r["step"] for r in held] == [0, 2]  # before any update, after the last
    for r in held:
        assert r["heldout_completions"] == 4  # 2 prompts x 2 samples
        assert 0.0 <= r["heldout_reward"] <= 1.0
    assert held[0]["heldout_kl"] == 0.0  # the same parameters, the same plan: bit for bit
    assert held[1]["heldout_kl"] != 0.0  # two updates at lr 1e-3 moved the policy away from its reference
    summary = json.loads((tmp_path / "runs" / "heldout" / "summary.json").read_text())
    assert summary["heldout_reward_before"] == held[0]["heldout_reward"]
    assert summary["heldout_reward_after"] == held[1]["heldout_reward"]
    assert summary["heldout_kl_after"] == held[1]["heldout_kl"]
