"""Offline CoPG pairs: a training prompt's real completion against a sample of the starting model."""

import json

import pytest
import torch

from hetsp.config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_export(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    (folder / "hetsp_export.json").write_text(json.dumps({"tokenizer": "bytes"}))


def test_pairs_are_real_bodies_against_samples_scored_by_the_reward(tmp_path):
    from hetsp.data.finetune import load_examples
    from hetsp.loading import resolve_config
    from hetsp.objectives.sampled_pairs import build_pairs, main
    from hetsp.rewards.funcbody import funcbody_reward

    _tiny_export(tmp_path / "model")
    raw = {
        "model": {"init_from": str(tmp_path / "model")},
        "data": {"dataset": "funcbody", "format": "prompt_completion", "tokenizer": "model", "max_documents": 20,
                 "max_seq_len": 1024},
        "train": {"objective": "copg"},
        "objective": {"data": str(tmp_path / "pairs.jsonl"), "reward_fn": "hetsp.rewards.funcbody:funcbody_reward",
                      "max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9, "max_prompt_tokens": 300},
    }
    cfg = resolve_config(config_from_dict(raw))
    rows = build_pairs(cfg, 3, seed=1, log=lambda *a, **k: None)
    real = {r["prompt"]: r["completion"] for r in load_examples(cfg.data)[0]}
    assert len(rows) == 3 and len({r["prompt"] for r in rows}) == 3
    for r in rows:
        assert r["chosen"] == real[r["prompt"]]  # the dataset's own body
        assert r["rejected"] and r["rejected"] != r["chosen"]
        assert len(r["prompt"].encode()) <= 300
        assert r["score_chosen"] == funcbody_reward(r["prompt"], r["chosen"])
        assert r["score_rejected"] == funcbody_reward(r["prompt"], r["rejected"])
    # the command writes the same rows (same seed) in the pair format offline CoPG reads
    (tmp_path / "cfg.toml").write_text(_toml(raw))
    assert main([str(tmp_path / "cfg.toml"), "--prompts", "3", "--seed", "1"]) == 0
    assert [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()] == rows


def test_pairs_need_a_reward_function(tmp_path):
    from hetsp.objectives.sampled_pairs import build_pairs

    cfg = config_from_dict({"train": {"objective": "copg"}, "objective": {"data": str(tmp_path / "p.jsonl")}})
    with pytest.raises(ValueError, match="objective.reward_fn"):
        build_pairs(cfg, 1, seed=0)


def _toml(raw):
    lines = []
    for section, table in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
