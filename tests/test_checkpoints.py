"""Starting from checkpoints: loading, fine-tuning data with prompt masks, LoRA, RoPE scaling, bad input.

Every model and tokenizer here is a tiny one written with `save_pretrained` in the test.
fp64 comparisons use rtol 1e-10 / atol 1e-12: the sums run in a different order under a
plan (per shard, over ranks), which costs a few ulps; anything structural is orders larger.
"""

import json
import random

import pytest
import torch

from hetsp.config import ClusterConfig, PlannerConfig, config_from_dict
from hetsp.plan import Group, MicroBatch, Plan
from solver import get_planner

from . import checkpoint_fns as cf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A sharded tiny Llama with a chat tokenizer (vocab 263 < 300 rows)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    cf.save_tiny_llama(folder, max_shard_size="20KB")
    cf.save_tiny_tokenizer(folder)
    return str(folder)


def _random_sequences(rng, n, vocab=263, lo=5, hi=30):
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _masked(seqs, prompt_lens):
    from hetsp.data.corpus import MaskedSequence

    return [MaskedSequence(s, [i >= p for i in range(len(s))]) for s, p in zip(seqs, prompt_lens)]


def reference(cfg_dict, sequences, prompt_lens=None):
    """One process, stock attention, whole sequences: mean CE over the targets (completion targets only
    when `prompt_lens`: target t+1 counts iff t+1 >= the prompt length) and trainable gradients."""
    model = cf.plain_model(cfg_dict, torch.float64, attn="sdpa")
    prompt_lens = prompt_lens or [1] * len(sequences)
    units = sum(len(s) - max(1, p) for s, p in zip(sequences, prompt_lens))
    total = 0.0
    for seq, p in zip(sequences, prompt_lens):
        logits = model(input_ids=torch.tensor([list(seq)])).logits[0]
        first = max(1, p) - 1  # first position whose next token is a target
        loss = torch.nn.functional.cross_entropy(logits[first:-1], torch.tensor(list(seq)[first + 1:]), reduction="sum") / units
        loss.backward()
        total += loss.item()
    return total, {n: q.grad for n, q in model.named_parameters() if q.requires_grad}


def _assert_step_matches(got, ref):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def _groups_of_2_and_3(n_seqs):
    # world 4: micro-batch 0 has groups [0,2) and [2,4); micro-batch 1 has [0,3) and an idle rank 3.
    half = n_seqs // 2
    return (MicroBatch((Group(0, 2, tuple(range(half))), Group(2, 2, ()))),
            MicroBatch((Group(0, 3, tuple(range(half, n_seqs))),)))


def _plan(seqs, plan_groups_fn):
    return Plan(tuple(len(s) for s in seqs), plan_groups_fn(len(seqs))).validate(4)


def test_loaded_checkpoint_step_matches_one_process(rank_pool, tiny):
    rng = random.Random(0)
    seqs = _random_sequences(rng, 4, lo=6, hi=40)
    cfg = {"model": {"init_from": tiny}, "data": {"tokenizer": "model"}}
    plan = _plan(seqs, _groups_of_2_and_3)
    got = rank_pool(4).run(cf.plan_loss_and_grads, cfg, seqs, plan.to_json())[0]
    _assert_step_matches(got, reference(cfg, seqs))


def test_zero3_loading_equals_zero1_bit_for_bit(rank_pool, tiny):
    z1 = rank_pool(2).run(cf.loaded_parameters, tiny, 1)[0]
    z3 = rank_pool(2).run(cf.loaded_parameters, tiny, 3)[0]
    from transformers import AutoModelForCausalLM

    ref = dict(AutoModelForCausalLM.from_pretrained(tiny).named_parameters())
    assert set(z1) == set(z3) == set(ref)
    for name in z1:
        assert torch.equal(z1[name], z3[name]), name
        assert torch.equal(z1[name], ref[name].detach()), name


def test_zero3_loading_of_a_hybrid_with_every_mixer_kind(rank_pool, tmp_path):
    """Under ZeRO-3 a checkpoint's model is built inside deepspeed.zero.Init, where each mixer is
    partitioned as soon as it is built: the SSM mixers' shape-dependent initialisation must not run
    on the partitions (it raised before), and every loaded value equals ZeRO-1's and transformers'."""
    from transformers import AutoModelForCausalLM

    from hetsp.config import ModelConfig
    from hetsp.model_registry import build_model

    from .test_ssm_parallel import _hybrid

    torch.manual_seed(0)
    build_model(ModelConfig(family="hybrid", **_hybrid("attention,s4d,ema,mamba2,seqboat")), 50).save_pretrained(
        tmp_path, safe_serialization=True)
    z1 = rank_pool(2).run(cf.loaded_parameters, str(tmp_path), 1)[0]
    z3 = rank_pool(2).run(cf.loaded_parameters, str(tmp_path), 3)[0]
    ref = dict(AutoModelForCausalLM.from_pretrained(tmp_path).named_parameters())
    assert set(z1) == set(z3) == set(ref)
    for name in z1:
        assert torch.equal(z3[name], z1[name]), name
        assert torch.equal(z3[name], ref[name].detach()), name


def test_prompt_masked_step_matches_completion_only_loss(rank_pool, tiny):
    rng = random.Random(1)
    seqs = _random_sequences(rng, 5, lo=8, hi=35)
    prompt_lens = [rng.randint(1, len(s) - 2) for s in seqs]
    cfg = {"model": {"init_from": tiny}, "data": {"tokenizer": "model"}}
    plan = get_planner("random", PlannerConfig(seed=5), ClusterConfig()).plan([len(s) for s in seqs], 3)
    got = rank_pool(3).run(cf.plan_loss_and_grads, cfg, _masked(seqs, prompt_lens), plan.to_json())[0]
    _assert_step_matches(got, reference(cfg, seqs, prompt_lens))


def test_chat_rendering_equals_apply_chat_template(tiny):
    from transformers import AutoTokenizer

    from hetsp.data import load_tokenizer
    from hetsp.data.finetune import render_messages

    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6, of course"}]
    ids, trainable = render_messages(load_tokenizer(tiny), conv, "test")
    hf = AutoTokenizer.from_pretrained(tiny)
    expected = hf.apply_chat_template(conv, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)
    # Trainable: exactly each assistant reply and its end token.
    text = "".join(hf.decode([t]) for t, m in zip(ids, trainable) if m)
    assert text == "4<|end|>6, of course<|end|>"


def test_finetune_data_from_jsonl(tmp_path, tiny):
    from hetsp.data import build_data

    rows = [{"prompt": f"q{i}: ", "completion": "a" * (i % 5 + 1)} for i in range(20)]
    path = tmp_path / "pc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = config_from_dict({"data": {"dataset": str(path), "format": "prompt_completion", "tokenizer": tiny,
                                     "max_seq_len": 16, "tokens_per_batch": 64, "validation_fraction": 0.1}})
    data = build_data(cfg.data, 0)
    seq = data.train_batch(0)[0]
    ids = list(seq)
    # Prompt "qN: " is 4-5 byte tokens; the completion and eos are the trainable tail.
    n_completion = sum(seq.trainable)
    assert ids[-1] == data.tokenizer.eos_token_id and all(seq.trainable[-n_completion:]) and not any(seq.trainable[:-n_completion])
    assert set(data.tokenizer.decode(ids[len(ids) - n_completion:-1])) == {"a"}


def test_lora_under_random_plan_matches_one_process(rank_pool, tiny):
    rng = random.Random(2)
    seqs = _random_sequences(rng, 5, lo=4, hi=30)
    cfg = {"model": {"init_from": tiny}, "data": {"tokenizer": "model"},
           "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}}
    plan = get_planner("random", PlannerConfig(seed=9), ClusterConfig()).plan([len(s) for s in seqs], 3)
    got = rank_pool(3).run(cf.plan_loss_and_grads, cfg, seqs, plan.to_json())[0]
    ref = reference(cfg, seqs)
    assert set(got[1]) and all("lora_" in n for n in got[1])
    _assert_step_matches(got, ref)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_lora_training_changes_only_the_adapter(rank_pool, tiny, tmp_path, zero_stage):
    rows = [{"prompt": f"def f{i}():\n", "completion": f"    return {i}\n"} for i in range(40)]
    path = tmp_path / "pc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {
        "run": {"name": "lora", "output_dir": str(tmp_path)},
        "model": {"init_from": tiny},
        "data": {"dataset": str(path), "format": "prompt_completion", "tokenizer": "model", "max_seq_len": 32,
                 "tokens_per_batch": 128, "validation_fraction": 0.0},
        "cluster": {"tokens_per_rank": 32},
        "planner": {"name": "random"},
        "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"steps": 3, "lr": 1e-2, "warmup_steps": 0, "zero_stage": zero_stage, "eval_every": 0,
                  "checkpoint_every": 3, "dtype": "fp32"},
    }
    records, params = rank_pool(2).run(cf.run_training, cfg, timeout=600)[0]
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(tiny).named_parameters())
    changed = 0
    for name, (value, trainable) in params.items():
        if trainable:
            assert "lora_" in name
            if "lora_B" in name:  # B starts at zero, so any update shows
                changed += int(value.abs().max() > 0)
        else:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(value, base[key].detach()), name
    assert changed == 4  # 2 layers x (q_proj, v_proj)
    assert len([r for r in records if "loss" in r]) == 3
    # Only the adapter is checkpointed: the saved module states hold no base weight.
    ckpt = tmp_path / "lora" / "checkpoints" / "step00000003"
    states = torch.load(next(ckpt.glob("*model_states.pt")), weights_only=False)["module"] or {}
    assert all("lora_" in k for k in states)
    if zero_stage == 1:
        _check_lora_exports(tmp_path, tiny, params)


def _check_lora_exports(tmp_path, tiny, params):
    """Merged export = base + (alpha / r) B A; the adapter folder and the run folder generate the same text."""
    from transformers import AutoModelForCausalLM

    from hetsp.export import export
    from hetsp.generate import generate, load_for_generation

    export(tmp_path / "lora" / "checkpoints", tmp_path / "merged")
    export(tmp_path / "lora" / "checkpoints", tmp_path / "adapter", lora_output="adapter")
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").named_parameters())
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    a, b = params[prefix + "lora_A.default.weight"][0], params[prefix + "lora_B.default.weight"][0]
    expected = params[prefix + "base_layer.weight"][0] + (8.0 / 4) * b @ a
    # fp32 merge (peft) against the same formula here: rounding of a 32-term matmul.
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, rtol=1e-5, atol=1e-6)
    texts = [generate(*load_for_generation(p), "def f1():\n", max_new_tokens=8)
             for p in (tmp_path / "merged", tmp_path / "adapter", tmp_path / "lora")]
    assert texts[0] == texts[1] == texts[2]


def test_rope_scaling_logits_past_original_max_match_one_process(rank_pool, tiny):
    from transformers import AutoModelForCausalLM

    rng = random.Random(3)
    seqs = [[rng.randrange(263) for _ in range(n)] for n in (150, 90, 20)]  # original max: 64 positions
    scaling = {"rope_type": "linear", "factor": 4.0}
    cfg = {"model": {"init_from": tiny, "rope_scaling": scaling, "max_position_embeddings": 256},
           "data": {"tokenizer": "model"}}
    plan = Plan(tuple(len(s) for s in seqs),
                (MicroBatch((Group(0, 3, (0,)),)), MicroBatch((Group(0, 2, (1,)), Group(2, 1, (2,)))))).validate(3)
    got = rank_pool(3).run(cf.plan_logits, cfg, seqs, plan.to_json())[0]
    ref_model = AutoModelForCausalLM.from_pretrained(tiny, rope_parameters=dict(scaling, rope_theta=10000.0), max_position_embeddings=256,
                                                     attn_implementation="sdpa").to(torch.float64)
    import types

    from .step_fns import _rmsnorm_in_input_dtype

    for m in ref_model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(_rmsnorm_in_input_dtype, m)
    plain = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="sdpa").to(torch.float64)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            ref = ref_model(input_ids=torch.tensor([s])).logits[0]
            torch.testing.assert_close(got[i], ref, rtol=1e-10, atol=1e-12)
        # The scaling is in effect: without it the logits past position 64 differ.
        unscaled = plain(input_ids=torch.tensor([seqs[0]])).logits[0]
        assert (unscaled[64:] - got[0][64:]).abs().max() > 1e-5  # fp64 agreement above is ~1e-15


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_rope_types_that_depend_on_the_shard_are_refused(tiny, rope_type):
    from hetsp.loading import resolve_config

    with pytest.raises(ValueError, match="rescale from the longest position"):
        resolve_config(config_from_dict({"model": {"init_from": tiny, "rope_scaling": {"rope_type": rope_type, "factor": 2.0}}}))


# --------------------------------------------------------------------------- bad input, before training


def test_folder_that_is_not_a_model(tmp_path):
    from hetsp.loading import resolve_config

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is not a model folder: it has no config.json"):
        resolve_config(config_from_dict({"model": {"init_from": str(tmp_path)}}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    from hetsp.loading import weight_files

    with pytest.raises(ValueError, match="has no model.safetensors"):
        weight_files(str(tmp_path))


def test_family_hetsp_cannot_run_exactly(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hetsp.loading import resolve_config

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'gpt2' is a family hetsp cannot run exactly"):
        resolve_config(config_from_dict({"model": {"init_from": str(tmp_path)}}))


def test_contradicting_shape_fields_name_both_values(tiny):
    from hetsp.loading import resolve_config

    with pytest.raises(ValueError, match=r"model.hidden_size = 128 contradicts the checkpoint's hidden_size = 32"):
        resolve_config(config_from_dict({"model": {"init_from": tiny, "hidden_size": 128}}))
    with pytest.raises(ValueError, match=r"model.family = 'hybrid' contradicts the checkpoint's family 'llama'"):
        resolve_config(config_from_dict({"model": {"init_from": tiny, "family": "hybrid"}}))
    # Agreeing values are fine; the resolved config carries the checkpoint's shape.
    cfg = resolve_config(config_from_dict({"model": {"init_from": tiny, "num_layers": 2}, "data": {"tokenizer": "model"}}))
    assert (cfg.model.hidden_size, cfg.model.vocab_size, cfg.data.tokenizer) == (32, 300, tiny)


def _data_cfg(path, tiny, **kw):
    return config_from_dict({"data": dict({"dataset": str(path), "tokenizer": tiny, "max_seq_len": 32,
                                           "tokens_per_batch": 64, "validation_fraction": 0.0}, **kw)})


def test_dataset_without_the_named_fields(tmp_path, tiny):
    from hetsp.data import build_data

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "a", "answer": "b"}))
    with pytest.raises(ValueError, match=r"has no field\(s\) \['prompt', 'completion'\].*'question', 'answer'"):
        build_data(_data_cfg(path, tiny, format="prompt_completion").data, 0)
    with pytest.raises(ValueError, match=r"has no field\(s\) \['messages'\]"):
        build_data(_data_cfg(path, tiny, format="messages").data, 0)


def test_conversation_without_assistant_turn(tmp_path, tiny):
    from hetsp.data import build_data

    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(ValueError, match="example 0: the conversation has no assistant turn"):
        build_data(_data_cfg(path, tiny, format="messages").data, 0)


def test_prompt_longer_than_max_seq_len_follows_the_policy(tmp_path, tiny):
    from hetsp.data import build_data

    rows = [{"prompt": "p" * 40, "completion": "cc"}, {"prompt": "short ", "completion": "c" * 40},
            {"prompt": "ok ", "completion": "fine"}]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="example 0: 43 tokens, longer than data.max_seq_len = 32"):
        build_data(_data_cfg(path, tiny, format="prompt_completion").data, 0)
    dropped = build_data(_data_cfg(path, tiny, format="prompt_completion", prompt_policy="drop").data, 0)
    assert dropped.stats["long_dropped"] == 2 and dropped.stats["train_sequences"] == 1
    kept = build_data(_data_cfg(path, tiny, format="prompt_completion", prompt_policy="keep_end").data, 0)
    # Example 0 keeps the last 29 prompt tokens + "cc" + eos; example 1's completion alone does not fit.
    assert kept.stats["long_dropped"] == 1 and kept.stats["prompts_cut"] == 1
    seqs = sorted((list(kept.train.get(i)) for i in range(len(kept.train))), key=len)
    assert len(seqs[-1]) == 32 and kept.tokenizer.decode(seqs[-1][:29]) == "p" * 29


def test_funcbody_examples_from_source():
    from hetsp.data.tasks.funcbody import function_examples

    src = 'class A:\n    @staticmethod\n    def f(x,\n          y):\n        """Add.\n\n        More."""\n        z = x + y\n        return z\n\n    def g(self):\n        return 1\n'
    (ex,) = function_examples(src)
    assert ex["prompt"] == '@staticmethod\ndef f(x,\n      y):\n    """Add.\n\n    More."""\n'
    assert ex["completion"] == "    z = x + y\n    return z\n"
    assert function_examples("def broken(:\n") == []


def _family_config(family):
    from transformers import MistralConfig, Qwen2Config

    from hetsp.config import ModelConfig

    small = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    if family == "qwen2":
        return Qwen2Config(**small)
    if family == "mistral":
        return MistralConfig(**small, sliding_window=None)
    mc = ModelConfig(family=family, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64,
                     max_position_embeddings=64,
                     extra={"layer_pattern": "attention,mamba2,s4d"} if family == "hybrid" else {})
    from hetsp.model_registry import build_hf_config

    return build_hf_config(mc, 50)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "bamba", "granitemoehybrid", "hybrid"])
def test_every_family_loads_as_from_pretrained(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from hetsp.loading import load_pretrained, resolve_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_family_config(family)).save_pretrained(tmp_path, safe_serialization=True)
    cfg = resolve_config(config_from_dict({"model": {"init_from": str(tmp_path)}, "data": {"max_seq_len": 32,
                                                                                          "tokens_per_batch": 64}}))
    assert cfg.model.family == family and cfg.model.hidden_size == 32
    model = load_pretrained(cfg.model, cfg.train, 1, torch.device("cpu"), None)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 50, (1, 20))
    with torch.no_grad():  # same weights, same code, one process: bit for bit
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


def test_loaded_sliding_window_model_step_matches_one_process(rank_pool, tmp_path):
    """A checkpoint whose sliding window is shorter than its sequences (Mistral, window 16, sequences
    up to 40 tokens) trains under ring attention's windows: loss and every gradient of a step under
    groups of 2 and 3 ranks equal one process with transformers' own sliding-window mask (fp64)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from hetsp.loading import resolve_config

    small = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(MistralConfig(**small, sliding_window=16)).save_pretrained(tmp_path)
    cfg = {"model": {"init_from": str(tmp_path)}, "data": {"tokenizer": "bytes", "max_seq_len": 48,
                                                         "tokens_per_batch": 96}}
    assert resolve_config(config_from_dict(cfg)).model.family == "mistral"
    seqs = _random_sequences(random.Random(1), 4, vocab=259, lo=20, hi=40)
    plan = _plan(seqs, _groups_of_2_and_3)
    got = rank_pool(4).run(cf.plan_loss_and_grads, cfg, seqs, plan.to_json())[0]
    _assert_step_matches(got, reference(cfg, seqs))
