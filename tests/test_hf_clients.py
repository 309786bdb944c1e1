"""transformers' Mamba-2 hybrids (Bamba, GraniteMoeHybrid) under hetsp sequence parallelism.

Reference: the stock model in one process, each document alone, eager
attention; loss = sum of token losses. fp32: loss and gradients rtol 1e-4 /
atol 1e-5 (sums over up to 4 ranks).
"""

import pytest
import torch

from . import ssm_fns

TINY = dict(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=48,
            extra={"mamba_chunk_size": 4, "mamba_d_state": 8, "attn_layer_indices": [1]})
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def test_registry_builds_tiny_families():
    from hetsp.config import ModelConfig
    from hetsp.model_registry import build_hf_config

    cfg = build_hf_config(ModelConfig(family="bamba", **TINY), 61)
    assert type(cfg).__name__ == "BambaConfig"
    assert cfg.layers_block_type == ["linear_attention", "full_attention", "linear_attention"]
    cfg = build_hf_config(ModelConfig(family="granitemoehybrid", **TINY), 61)
    assert cfg.layer_types == ["linear_attention", "full_attention", "linear_attention"]


def test_bad_mamba_heads_is_a_config_error():
    from hetsp.config import ConfigError, ModelConfig
    from hetsp.model_registry import build_hf_config

    with pytest.raises(ConfigError, match="mamba_n_heads"):
        build_hf_config(ModelConfig(family="bamba", **{**TINY, "extra": {"mamba_n_heads": 5}}), 61)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_hf_hybrids_match_single_process(rank_pool, world):
    layouts = {
        1: [([(0, 1)], [[9, 1, 6]])],
        2: [([(0, 2)], [[11, 1, 3]])],
        3: [([(0, 3)], [[2, 14]])],
        4: [([(0, 4)], [[13, 3, 1]]), ([(0, 2), (2, 2)], [[7, 1], [2, 12]])],
    }[world]
    cases = []
    for i, (groups, lengths) in enumerate(layouts):
        for family in ("bamba", "granitemoehybrid"):
            cases.append((family, TINY, groups, lengths, 100 * world + i, "separate", torch.float32))
    ssm_fns.check_model_results(rank_pool(world).run(ssm_fns.model_cases, cases), cases, GRAD_TOL)


def test_unverified_mamba2_family_is_refused():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from hetsp.ssm_parallel import parallelize

    model = Mamba2ForCausalLM(
        Mamba2Config(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_heads=4, head_dim=16, state_size=8, n_groups=1)
    )
    with pytest.raises(ValueError, match="does not make Mamba2Mixer sequence-parallel.*handles: BambaMixer, GraniteMoeHybridMambaLayer"):
        parallelize(model)
