"""SequenceMatch with LoRA, and under ZeRO-3, from checkpoints without the `<bkspc>` row, on 2 gloo ranks.

LoRA: the `<bkspc>` embedding and output rows (one shared row when tied) train beside the
adapters while the rest of the base stays frozen; the run resumes exactly; the merged export and
base + adapter folder reproduce the run's model. ZeRO-3: the row is added while loading, before
partitioning, with the mean initialisation of the other stages, and the first step's loss equals
the ZeRO-2 run's.

Tolerances: the exports are compared in fp32 with rtol 1e-5 / atol 1e-5 on logits of order 1: a
merged weight W + s B A (and the `<bkspc>` row written into W) computes the same products as the
run's unmerged layers in another order, a few fp32 ulps per dot product of 32-64 terms.
"""

import copy
import math
from pathlib import Path

import pytest
import torch

from . import checkpoint_fns as cf
from .test_sequencematch_train import sm_config
from .test_ssm_parallel import _hybrid

BK = 259  # the byte tokenizer's <bkspc>: the first id past the start model's 259 rows
TARGETS = {"llama": ["q_proj", "v_proj"], "hybrid": ["up_proj", "down_proj"]}
TIED = {"llama": False, "hybrid": True}


def _start_model(folder: Path, family: str) -> Path:
    """A tiny model with the byte vocabulary and no <bkspc> row: an untied Llama, or a tied hybrid."""
    from hetsp.config import ModelConfig
    from hetsp.model_registry import build_model

    if not (folder / "config.json").exists():
        if family == "llama":
            cf.save_tiny_llama(folder, vocab_size=259, max_position_embeddings=128)
        else:
            torch.manual_seed(0)
            build_model(ModelConfig(family="hybrid", tie_word_embeddings=True, **_hybrid("attention,mamba2")),
                        259).save_pretrained(folder)
    return folder


def _config(tmp_path: Path, name: str, family: str, zero_stage: int, lora: bool = True, **train) -> dict:
    cfg = sm_config(tmp_path, name, steps=3, checkpoint_every=3, zero_stage=zero_stage, dtype="fp32", lr=1e-2, **train)
    cfg["model"]["init_from"] = str(_start_model(tmp_path / f"start_{family}", family))
    # SequenceMatch from step 1 on data only: noise puts <bkspc> into every batch
    cfg["objective"] = {"noise_p": 0.3, "bc_steps": 1, "alpha": 0.5, "w_data": 1.0, "chi2": 0.5, "gamma": 0.99}
    if lora:
        cfg["lora"] = {"r": 4, "alpha": 8.0, "target_modules": TARGETS[family]}
    return cfg


def _grown_start(start: str) -> torch.nn.Module:
    """The start model with its <bkspc> rows at their mean initialisation (the ZeRO 1/2 reference)."""
    from transformers import AutoModelForCausalLM

    import models  # noqa: F401  registers the hybrid family
    from hetsp.objectives.sequencematch import add_bkspc_rows

    return add_bkspc_rows(AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32), BK + 1)


def _run_model(cfg: dict, params: dict) -> torch.nn.Module:
    """The run's model in one process: the grown base, LoRA and the trainable rows, every parameter
    set to the run's final value."""
    from hetsp.config import LoraConfig
    from hetsp.lora import apply_lora, train_bkspc_rows

    model = apply_lora(_grown_start(cfg["model"]["init_from"]), LoraConfig(**{**cfg["lora"], "target_modules": tuple(cfg["lora"]["target_modules"])}))
    train_bkspc_rows(model, BK)
    named = dict(model.named_parameters())
    assert set(named) == set(params)
    with torch.no_grad():
        for n, (value, _) in params.items():
            named[n].copy_(value)
    return model.eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("family,zero_stage", [("hybrid", 1), ("llama", 3), ("hybrid", 3)])
def test_lora_sequencematch_trains_rows_adapters_resumes_and_exports(rank_pool, tmp_path, family, zero_stage):
    pool = rank_pool(2)
    cfg = _config(tmp_path, "lora_sm", family, zero_stage)
    records, params = pool.run(cf.run_training, cfg, timeout=900)[0]
    steps = [r for r in records if r.get("kind") == "train"]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps) and steps[1]["sm_weight"] == 0.5

    start = _grown_start(cfg["model"]["init_from"])
    base = dict(start.named_parameters())
    trainable = {n for n, (_, t) in params.items() if t}
    rows = {n for n in trainable if n.endswith(".bkspc_row")}
    assert len(rows) == (1 if TIED[family] else 2)  # tied: the one shared row
    assert trainable - rows and all("lora_" in n for n in trainable - rows)
    for n in rows:  # each row moved away from its mean initialisation
        layer = "model.embed_tokens.weight" if "embed_tokens" in n else "lm_head.weight"
        assert (params[n][0] - base[layer][BK]).abs().max() > 1e-3, n
    assert all(params[n][0].abs().max() > 0 for n in trainable if "lora_B" in n)  # B starts at zero
    for n, (value, t) in params.items():  # the frozen base, its <bkspc> rows included, is untouched
        if not t:
            key = n.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(value, base[key].detach()), n

    # stop after 2 steps, resume: the same losses (sums in the same order up to DeepSpeed's reduction order)
    first = _config(tmp_path, "lora_sm_resumed", family, zero_stage, stop_after=2)
    pool.run(cf.run_training, first, timeout=900)
    second = copy.deepcopy(first)
    second["train"]["stop_after"] = 0
    resumed, resumed_params = pool.run(cf.run_training, second, True, timeout=900)[0]
    assert [r["loss"] for r in resumed if "loss" in r] == pytest.approx([r["loss"] for r in steps], rel=1e-6, abs=1e-7)
    for n in rows:  # the rows were checkpointed and restored
        torch.testing.assert_close(resumed_params[n][0], params[n][0], rtol=1e-5, atol=1e-6)

    # the merged export and base + adapter reproduce the run's model, <bkspc> rows included
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hetsp.export import export
    from hetsp.generate import load_for_generation

    run_model = _run_model(cfg, params)
    ids = [72, 101, BK, 108, 108, BK, BK, 111, 32, 119]
    want = _logits(run_model, ids)
    ckpt = tmp_path / "runs" / "lora_sm" / "checkpoints"
    merged = AutoModelForCausalLM.from_pretrained(export(ckpt, tmp_path / "merged"), dtype=torch.float32)
    assert merged.config.vocab_size == BK + 1 and merged.config.bkspc_token_id == BK
    torch.testing.assert_close(_logits(merged, ids), want, rtol=1e-5, atol=1e-5)
    adapter = export(ckpt, tmp_path / "adapter", lora_output="adapter")
    saved = load_file(adapter / "adapter_model.safetensors")  # the rows as trainable tokens, no whole embedding
    assert any("trainable_tokens_delta" in k for k in saved) and not any(k.endswith("embed_tokens.weight") for k in saved)
    reloaded, _ = load_for_generation(adapter)  # the base grown to the run's vocabulary, then the adapter
    torch.testing.assert_close(_logits(reloaded, ids), want, rtol=1e-5, atol=1e-5)
    # the rows matter: the base alone (mean rows, no adapter) differs at the <bkspc> logit
    assert (_logits(start, ids)[:, BK] - want[:, BK]).abs().max() > 1e-3


def test_zero3_adds_the_bkspc_row_before_partitioning(rank_pool, tmp_path):
    """A checkpoint without the row under ZeRO-3: loaded with the row (the mean of the checkpoint's rows,
    as ZeRO 1/2 add it), and the first step's loss equals the ZeRO-2 run's."""
    pool = rank_pool(2)
    start = str(_start_model(tmp_path / "start_llama", "llama"))
    loaded = pool.run(cf.loaded_parameters, start, 3, BK + 1)[0]
    grown = dict(_grown_start(start).named_parameters())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert loaded[name].shape[0] == BK + 1
        # the same fp32 mean of the same fp32 rows: bit for bit
        torch.testing.assert_close(loaded[name], grown[name].detach(), rtol=0, atol=0)

    runs = {}
    for stage in (2, 3):
        cfg = _config(tmp_path, f"zero{stage}", "llama", stage, lora=False)
        runs[stage] = [r for r in pool.run(cf.run_training, cfg, timeout=900)[0][0] if r.get("kind") == "train"]
        assert len(runs[stage]) == 3 and all(math.isfinite(r["loss"]) for r in runs[stage])
    # the same weights and batch: the step-0 loss differs only by the order of fp32 sums over ranks
    assert runs[3][0]["loss"] == pytest.approx(runs[2][0]["loss"], rel=1e-6, abs=1e-7)
    # the ZeRO-3 checkpoint exports with the row
    from transformers import AutoModelForCausalLM

    from hetsp.export import export

    out = AutoModelForCausalLM.from_pretrained(export(tmp_path / "runs" / "zero3" / "checkpoints", tmp_path / "export"))
    assert out.config.bkspc_token_id == BK and out.get_input_embeddings().weight.shape[0] == BK + 1


def test_lora_without_bkspc_adds_no_rows_and_the_reference_is_the_base(tmp_path):
    """An objective without `<bkspc>` (CoPG, whose reference is the base with adapters disabled): LoRA
    alone trains, no row is added, and `adapters_disabled` gives the base model's logits."""
    from transformers import AutoModelForCausalLM

    from hetsp.config import config_from_dict
    from hetsp.data.tokenizer import ByteTokenizer
    from hetsp.loading import build_training_model, resolve_config
    from hetsp.objectives.reference import adapters_disabled

    start = _start_model(tmp_path / "start_llama", "llama")
    cfg = resolve_config(config_from_dict({"model": {"init_from": str(start)}, "data": {"tokenizer": "bytes"},
                                           "lora": {"r": 4, "alpha": 8.0, "target_modules": TARGETS["llama"]}}))

    class Data:
        tokenizer = ByteTokenizer()
        vocab_size = tokenizer.vocab_size

    model = build_training_model(cfg, Data, 1, torch.device("cpu"), "sdpa").eval()
    assert model.config.vocab_size == 259
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = [72, 101, 108, 108, 111]
    base = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32, attn_implementation="sdpa")
    with adapters_disabled(model):
        # the same layers with the adapters off: the same fp32 operations
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=0, atol=0)
    assert (_logits(model, ids) - _logits(base, ids)).abs().max() > 1e-3  # the adapters are on again


def test_lora_on_the_output_layer_is_refused_with_bkspc(tmp_path):
    """A LoRA-adapted output layer would add its own delta to the <bkspc> logit: refused."""
    from hetsp.config import LoraConfig
    from hetsp.lora import apply_lora, train_bkspc_rows

    model = apply_lora(_grown_start(str(_start_model(tmp_path / "start_llama", "llama"))),
                       LoraConfig(r=2, alpha=4.0, target_modules=("q_proj", "lm_head")))
    with pytest.raises(NotImplementedError, match="lora.target_modules"):
        train_bkspc_rows(model, BK)
