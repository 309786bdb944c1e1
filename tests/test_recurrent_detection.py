"""`parallelize` refuses, by class name, every recurrent or causal-convolution mixer that hetsp
does not handle; the executor refuses a model with such layers that was not parallelized."""

import pytest
import torch

from hetsp.ssm_parallel import parallelize
from hetsp.ssm_parallel.detect import recurrent_modules

SMALL = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)


def _jamba():
    from transformers import JambaConfig

    return JambaConfig(**SMALL, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                       num_experts=2, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False), "JambaMambaMixer"


def _mamba():
    from transformers import MambaConfig

    return MambaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, state_size=4, conv_kernel=4), "MambaMixer"


def _falcon_mamba():
    from transformers import FalconMambaConfig

    return FalconMambaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, state_size=4, conv_kernel=4), "FalconMambaMixer"


def _lfm2():
    from transformers import Lfm2Config

    return Lfm2Config(**SMALL, layer_types=["conv", "full_attention"], conv_L_cache=3), "Lfm2ShortConv"


def _qwen3_next():
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(**SMALL, head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                           linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                           num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16), "Qwen3NextGatedDeltaNet"


@pytest.mark.parametrize("build", [_jamba, _mamba, _falcon_mamba, _lfm2, _qwen3_next], ids=lambda f: f.__name__[1:])
def test_unhandled_recurrent_mixer_is_refused_by_name(build):
    from transformers import AutoModelForCausalLM

    cfg, mixer = build()
    model = AutoModelForCausalLM.from_config(cfg)
    assert any(type(m).__name__ == mixer for _, m, why in recurrent_modules(model) if why is not None)
    with pytest.raises(ValueError, match=f"does not make {mixer}"):
        parallelize(model)
    assert not getattr(model, "_hetsp_ssm_parallel", False)


def test_attention_only_and_handled_models_pass():
    from transformers import AutoModelForCausalLM, BambaConfig, LlamaConfig

    llama = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL))
    assert recurrent_modules(llama) == []
    bamba = AutoModelForCausalLM.from_config(
        BambaConfig(**SMALL, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=4)
    )
    assert [type(m).__name__ for _, m, why in recurrent_modules(bamba)] == ["BambaMixer"]
    assert parallelize(bamba) is bamba


def _hybrid_model():
    from hetsp.config import ModelConfig
    from hetsp.model_registry import build_model

    from .test_ssm_parallel import SSM_ONLY

    return build_model(ModelConfig(family="hybrid", **SSM_ONLY), 50, attn_implementation="eager")


def test_hybrid_mixers_are_handled():
    kinds = sorted(m.kind for _, m, why in recurrent_modules(_hybrid_model()) if why is None)
    assert kinds == ["ema", "mamba2", "s4d", "seqboat"]


def test_executor_refuses_a_model_that_was_not_parallelized():
    from hetsp.executor import PlainEngine, run_plan
    from hetsp.objectives.lm import LanguageModeling
    from hetsp.plan import Group, MicroBatch, Plan

    plan = Plan(lengths=(5,), micro_batches=(MicroBatch(groups=(Group(0, 1, (0,)),)),))
    seqs = [[1, 2, 3, 4, 5]]
    model = _hybrid_model()
    with pytest.raises(ValueError, match="not prepared for sequence parallelism.*parallelize"):
        run_plan(PlainEngine(model), plan, seqs, 0, 1, torch.device("cpu"), LanguageModeling(), train=False)
    # once parallelized it runs (SSM layers only: no attention implementation needed)
    result = run_plan(PlainEngine(parallelize(model)), plan, seqs, 0, 1, torch.device("cpu"), LanguageModeling(), train=False)
    assert result.num_units == 4
    # per micro-batch: when it started and ended on this rank, and its thread's CPU seconds (bench/cost_model.py)
    (start, end), = result.micro_batch_s
    assert 0 <= start <= end and len(result.micro_batch_cpu_s) == 1 and result.micro_batch_cpu_s[0] >= 0
