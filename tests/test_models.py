"""HybridForCausalLM: packed rows, kernel swapping, attention interface, save/load, overfitting, config errors."""

from __future__ import annotations

import pytest
import torch

from models import HybridConfig, HybridForCausalLM, MIXER_KINDS
from models.kernels import REFERENCE_KERNELS

ALL_KINDS = "attention,s4d,ema,mamba2,seqboat"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(layer_pattern=ALL_KINDS, num_layers=None, **overrides) -> HybridConfig:
    kinds = layer_pattern.split(",")
    cfg = dict(
        vocab_size=41,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers or len(kinds),
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_pattern=layer_pattern,
        s4d_state_size=8,
        ema_dim=4,
        scan_chunk_size=4,
        mamba_d_state=8,
        mamba_head_dim=16,
        mamba_chunk_size=4,
        seqboat_window=3,
        seqboat_z_dim=8,
        seqboat_v_dim=16,
    )
    cfg.update(overrides)
    return HybridConfig(**cfg)


def tiny_model(layer_pattern=ALL_KINDS, seed=0, dtype=torch.float64, **overrides) -> HybridForCausalLM:
    torch.manual_seed(seed)
    model = HybridForCausalLM(tiny_config(layer_pattern, **overrides))
    return model.to(dtype).eval()


class Shard:
    """Stands in for the runtime's shard metadata: only `cu_seqlens` is read by the model."""

    def __init__(self, cu_seqlens):
        self.cu_seqlens = cu_seqlens


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pass_as", ["cu_seqlens", "hetsp_shard"])
def test_packed_row_equals_documents_run_alone(pass_as):
    model = tiny_model()
    torch.manual_seed(1)
    cu = torch.tensor([0, 7, 8, 19, 26], dtype=torch.int32)
    ids = torch.randint(0, 41, (1, 26))
    kwargs = {"cu_seqlens": cu} if pass_as == "cu_seqlens" else {"hetsp_shard": Shard(cu)}
    weights = torch.randn(1, 26, 41, dtype=torch.float64)
    packed = model(input_ids=ids, **kwargs).logits
    (packed * weights).sum().backward()
    grads_packed = _grads(model)
    model.zero_grad()
    pieces = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        logits = model(input_ids=ids[:, a:b]).logits
        (logits * weights[:, a:b]).sum().backward()
        pieces.append(logits)
    torch.testing.assert_close(packed, torch.cat(pieces, 1), rtol=1e-10, atol=1e-10)
    grads_sep = _grads(model)
    assert grads_packed.keys() == grads_sep.keys() and len(grads_packed) == len(list(model.parameters()))
    for name in grads_packed:
        torch.testing.assert_close(grads_packed[name], grads_sep[name], rtol=1e-9, atol=1e-9, msg=name)


def test_eager_and_sdpa_attention_agree_on_plain_and_packed_rows():
    model = tiny_model("attention,mamba2")
    ids = torch.randint(0, 41, (1, 12))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    outs = {}
    for impl in ("sdpa", "eager"):
        model.config._attn_implementation = impl
        outs[impl] = (model(input_ids=ids).logits, model(input_ids=ids, cu_seqlens=cu).logits)
    for a, b in zip(outs["sdpa"], outs["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_reference_kernels_give_the_same_model_output():
    model = tiny_model()
    ids = torch.randint(0, 41, (2, 11))
    fast = model(input_ids=ids).logits
    model.set_kernels(**REFERENCE_KERNELS)
    torch.testing.assert_close(model(input_ids=ids).logits, fast, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="valid names"):
        model.set_kernels(no_such_kernel=lambda *a: None)


def test_swapped_kernel_is_called_with_state_arguments():
    model = tiny_model("mamba2")
    calls = []

    def spy(x, dt, A, B, C, chunk_size, cu_seqlens=None, initial_states=None):
        calls.append((tuple(x.shape), cu_seqlens))
        return REFERENCE_KERNELS["ssd_scan"](x, dt, A, B, C, chunk_size, cu_seqlens, initial_states)

    model.set_kernels(ssd_scan=spy)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    model(input_ids=torch.randint(0, 41, (1, 9)), cu_seqlens=cu)
    assert len(calls) == 1 and calls[0][1] is cu


def test_attention_goes_through_the_registered_interface_with_forward_kwargs():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def spy_attention(module, q, k, v, attention_mask, **kwargs):
        seen.append(kwargs.get("hetsp_shard"))
        return sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)

    AttentionInterface.register("hybrid_test_spy", spy_attention)
    model = tiny_model("attention,mamba2")
    ids = torch.randint(0, 41, (1, 9))
    reference = model(input_ids=ids).logits
    model.config._attn_implementation = "hybrid_test_spy"
    shard = Shard(None)
    out = model(input_ids=ids, hetsp_shard=shard).logits
    assert seen == [shard]
    # This backend gets no mask: sdpa then applies plain causal masking, the same result.
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)


def test_save_and_load_round_trip(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model()
    ids = torch.randint(0, 41, (2, 10))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).layer_kinds == list(MIXER_KINDS)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert isinstance(loaded, HybridForCausalLM)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_seqboat_reports_activation_ratio():
    model = tiny_model("seqboat,attention,seqboat")
    model(input_ids=torch.randint(0, 41, (2, 16)))
    metrics = model.mixer_metrics()
    assert sorted(metrics) == ["layers.0.seqboat", "layers.2.seqboat"]
    assert all(0.0 <= r <= 1.0 for r in metrics.values())


def test_seqboat_router_gets_gradient_through_winning_probability():
    model = tiny_model("seqboat")
    out = model(input_ids=torch.randint(0, 41, (2, 16)))
    out.logits.square().mean().backward()
    mixer = model.model.layers[0].mixer
    assert mixer.log_tau.grad is not None and mixer.log_tau.grad.abs() > 0
    assert mixer.gau_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", MIXER_KINDS)
def test_tiny_model_overfits_a_repeated_batch(kind):
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config(kind, num_layers=2)).train()
    ids = torch.randint(0, 41, (2, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(layer_pattern="mamba2,lstm"), r"unknown mixer kind\(s\) \['lstm'\]; valid kinds are \['attention', 's4d'"),
        (dict(layer_pattern="attention", num_attention_heads=3), "divisible by num_attention_heads"),
        (dict(layer_pattern="attention", num_key_value_heads=3), "divisible by num_key_value_heads"),
        (dict(layer_pattern="mamba2", mamba_head_dim=24), "divisible by mamba_head_dim"),
        (dict(layer_pattern="mamba2", mamba_n_groups=3), "divisible by mamba_n_groups"),
        (dict(layer_pattern="seqboat", seqboat_window=0), "seqboat_window must be a positive"),
        (dict(layer_pattern="s4d", s4d_state_size=7), "s4d_state_size"),
        (dict(layer_pattern=""), "layer_pattern is empty"),
    ],
)
def test_bad_config_is_rejected_when_built(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_registry_builds_hybrid_config_from_model_section():
    from hetsp.config import ConfigError, ModelConfig
    from hetsp.model_registry import build_hf_config

    section = ModelConfig(
        family="hybrid", hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=1, intermediate_size=96,
        max_position_embeddings=512, rope_theta=5000.0, tie_word_embeddings=True,
        extra={"layer_pattern": "seqboat,mamba2", "mamba_head_dim": 16, "seqboat_window": 8},
    )
    cfg = build_hf_config(section, 300)
    assert isinstance(cfg, HybridConfig)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (300, 64, 3, 4)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.max_position_embeddings) == (1, 96, 512)
    assert cfg.rope_theta == 5000.0 and cfg.tie_word_embeddings
    assert cfg.layer_kinds == ["seqboat", "mamba2", "seqboat"] and cfg.seqboat_window == 8
    with pytest.raises(ConfigError, match="unknown key"):
        build_hf_config(ModelConfig(family="hybrid", extra={"no_such_option": 1}), 300)
    with pytest.raises(ConfigError, match="valid kinds are"):
        build_hf_config(ModelConfig(family="hybrid", extra={"layer_pattern": "mamba3"}), 300)


def test_models_do_not_import_the_runtime():
    """The dependency is one way: hetsp registers and parallelizes models; `models` imports no hetsp module."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, models, models.kernels, models.mixers, models.modeling_hybrid; "
        "bad = sorted(m for m in sys.modules if m == 'hetsp' or m.startswith('hetsp.')); "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_s4d_initialisations(init):
    """S4D-Lin: a_n = -1/2 + i pi n; S4D-Inv: a_n = -1/2 + i (N/pi)(N/(2n+1) - 1); log dt in [log 1e-3, log 1e-1]."""
    model = tiny_model("s4d", s4d_init=init)
    mixer = model.model.layers[0].mixer
    n = torch.arange(4, dtype=torch.float64)
    expected = torch.pi * n if init == "lin" else (8 / torch.pi) * (8 / (2 * n + 1) - 1)
    torch.testing.assert_close(mixer.a_im[0], expected)
    torch.testing.assert_close(torch.exp(mixer.log_a_re), torch.full_like(mixer.log_a_re, 0.5))
    assert mixer.log_dt.min() >= torch.log(torch.tensor(1e-3)) and mixer.log_dt.max() <= torch.log(torch.tensor(1e-1))
