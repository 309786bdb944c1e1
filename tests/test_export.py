"""hetsp-export: DeepSpeed ZeRO checkpoints written by a 2-rank gloo job load back with from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hetsp.config import Config, config_to_toml
from hetsp.export import ExportError, export, main, match_keys, resolve_checkpoint

from . import export_fns


def _write_run_config(run: Path, tie: bool) -> None:
    cfg = Config(model=export_fns.tiny_model_config(tie_word_embeddings=tie))
    (run / "config.toml").write_text(config_to_toml(cfg))


@pytest.mark.parametrize("zero_stage,tie", [(1, False), (2, True), (3, True)])
def test_export_roundtrip(rank_pool, tmp_path, zero_stage, tie):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    run.mkdir()
    _write_run_config(run, tie)
    params = rank_pool(2).run(export_fns.train_step_and_save, str(run), zero_stage, tie, timeout=240)[0]

    out = tmp_path / "hf"
    assert main([str(run / "checkpoints"), str(out)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    got = dict(loaded.named_parameters())
    assert set(got) == set(params)
    for name, value in params.items():
        torch.testing.assert_close(got[name].detach(), value, rtol=0, atol=0, msg=name)
    assert loaded.config.tie_word_embeddings == tie
    # The step changed the weights, so matching them is not matching a fresh initialisation.
    from hetsp.model_registry import build_model

    torch.manual_seed(0)
    initial = dict(build_model(export_fns.tiny_model_config(tie), export_fns.VOCAB_SIZE).named_parameters())
    assert any(not torch.equal(initial[name].detach(), value) for name, value in params.items())
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    info = json.loads((out / "hetsp_export.json").read_text())
    assert info["tag"] == "step00000001" and info["meta"]["step"] == 1


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope", None)
    (tmp_path / "ck").mkdir()
    with pytest.raises(ExportError, match="no 'latest' file"):
        resolve_checkpoint(tmp_path / "ck", None)
    with pytest.raises(ExportError, match="tag 'step1' not found"):
        resolve_checkpoint(tmp_path / "ck", "step1")
    tag_dir = tmp_path / "ck" / "step1"
    tag_dir.mkdir()
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tmp_path / "ck" / "latest").write_text("step1\n")
    assert resolve_checkpoint(tmp_path / "ck", None) == (tmp_path / "ck", "step1")
    assert resolve_checkpoint(tag_dir, None) == (tmp_path / "ck", "step1")


def test_missing_meta_and_config_are_named(tmp_path, capsys):
    tag_dir = tmp_path / "run" / "checkpoints" / "step1"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert main([str(tag_dir), str(tmp_path / "out")]) == 2
    assert "hetsp_meta.json not found" in capsys.readouterr().err
    (tag_dir / "hetsp_meta.json").write_text(json.dumps({"vocab_size": 10, "step": 1}))
    assert main([str(tag_dir), str(tmp_path / "out")]) == 2
    assert "config.toml not found" in capsys.readouterr().err
    _write_run_config(tmp_path / "run", tie=False)
    assert main([str(tag_dir), str(tmp_path / "out")]) == 2
    assert "no *_optim_states.pt" in capsys.readouterr().err


def test_output_folder_not_overwritten(tmp_path):
    tag_dir = tmp_path / "checkpoints" / "step1"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(ExportError, match="--overwrite"):
        export(tag_dir, out)


def test_match_keys():
    expected = {"model.a", "lm_head.w"}
    assert match_keys({"model.a": 1, "lm_head.w": 2}, expected) == {"model.a": 1, "lm_head.w": 2}
    assert match_keys({"module.model.a": 1, "module.lm_head.w": 2}, expected) == {"model.a": 1, "lm_head.w": 2}
    with pytest.raises(ExportError, match=r"missing \['lm_head.w'\]"):
        match_keys({"model.a": 1}, expected)
