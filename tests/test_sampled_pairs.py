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


def _config(tmp_path, max_new_tokens=6):
    from hetsp.loading import resolve_config

    _tiny_export(tmp_path / "model")
    return resolve_config(config_from_dict({
        "model": {"init_from": str(tmp_path / "model")},
        "data": {"dataset": "funcbody", "format": "prompt_completion", "tokenizer": "model", "max_documents": 20,
                 "max_seq_len": 1024},
        "train": {"objective": "copg"},
        "objective": {"data": str(tmp_path / "pairs.jsonl"), "reward_fn": "hetsp.rewards.funcbody:funcbody_reward",
                      "max_new_tokens": max_new_tokens, "temperature": 1.0, "top_p": 0.9, "max_prompt_tokens": 300},
    }))


def test_samples_are_those_of_sample_in_lockstep_with_the_same_seed(tmp_path, monkeypatch):
    from hetsp.data.tokenizer import load_tokenizer
    from hetsp.generate import load_for_generation
    from hetsp.generation import sampling
    from hetsp.generation.sampling import sample_in_lockstep
    from hetsp.objectives.sampled_pairs import build_pairs

    cfg = _config(tmp_path)
    drawn = []  # the token ids build_pairs got from the sampler

    def spy(*args, **kwargs):
        out = sample_in_lockstep(*args, **kwargs)
        drawn.extend(s for (s,) in out)
        return out

    monkeypatch.setattr(sampling, "sample_in_lockstep", spy)
    rows = build_pairs(cfg, 3, seed=2, log=lambda *a, **k: None, batch=2)  # two calls: 2 prompts, then 1
    monkeypatch.undo()
    tok = load_tokenizer(cfg.data.tokenizer)
    model, _ = load_for_generation(cfg.model.init_from)
    prompts = [list(tok.encode(r["prompt"])) for r in rows]
    gen = torch.Generator().manual_seed(2)
    direct = [s for chunk in (prompts[:2], prompts[2:])
              for (s,) in sample_in_lockstep(model, chunk, 1, 6, gen, temperature=1.0, top_p=0.9,
                                             eos_token_id=tok.eos_token_id)]
    assert drawn == direct  # the same token ids, eos included where drawn
    direct = [[t for t in s if t != tok.eos_token_id] for s in direct]
    assert all(d and tok.decode(d) != r["chosen"] for d, r in zip(direct, rows))  # no redraw: first draws kept
    assert [r["rejected"] for r in rows] == [tok.decode(d) for d in direct]


def test_a_sample_equal_to_the_real_completion_is_redrawn_and_a_prompt_that_keeps_it_is_skipped(tmp_path, monkeypatch):
    from hetsp.data.finetune import load_examples
    from hetsp.data.tokenizer import load_tokenizer
    from hetsp.generation import sampling
    from hetsp.objectives.sampled_pairs import DRAWS, build_pairs

    cfg = _config(tmp_path)
    tok = load_tokenizer(cfg.data.tokenizer)
    real = {tuple(tok.encode(r["prompt"])): r["completion"] for r in load_examples(cfg.data)[0]}
    calls = []  # prompts (as texts) of each sampler call
    state = {"first": None}
    original = sampling.sample_in_lockstep

    def sampler(model, prompts, k, *args, **kwargs):
        out = original(model, prompts, k, *args, **kwargs)
        calls.append([tuple(p) for p in prompts])
        if state["first"] is None:
            state["first"] = (tuple(prompts[0]), tuple(prompts[1]))
        for j, p in enumerate(prompts):
            if tuple(p) == state["first"][0] and len(calls) == 1:
                out[j] = [list(tok.encode(real[tuple(p)])) + [tok.eos_token_id]]  # once: redrawn
            if tuple(p) == state["first"][1]:
                out[j] = [[tok.eos_token_id]]  # always empty: skipped after DRAWS draws
        return out

    monkeypatch.setattr(sampling, "sample_in_lockstep", sampler)
    lines = []
    rows = build_pairs(cfg, 3, seed=1, log=lambda *a, **k: lines.append(a[0]), batch=8)
    redrawn, skipped = state["first"]
    assert calls[0][:2] == [redrawn, skipped] and len(calls[0]) == 3
    assert calls[1] == [redrawn, skipped]  # the batched redraw round: only the rejected prompts
    assert calls[2:DRAWS] == [[skipped]] * (DRAWS - 2)
    assert len(calls[DRAWS]) == 1 and calls[DRAWS][0] not in (redrawn, skipped)  # the next usable prompt
    by_prompt = {tuple(tok.encode(r["prompt"])): r for r in rows}
    assert len(rows) == 3 and skipped not in by_prompt and redrawn in by_prompt
    assert by_prompt[redrawn]["rejected"] and by_prompt[redrawn]["rejected"] != by_prompt[redrawn]["chosen"]
    assert any("1 prompt(s) skipped" in line for line in lines)
