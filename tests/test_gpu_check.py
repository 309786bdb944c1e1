"""The GPU check's own logic, without a GPU: its dry mode, the chunked fp64 reference, the
result writer, the datasets-free corpus of the main-job step, and the option paths it tunes
(Triton tiles, kernel choice)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_of_the_gpu_check_exits_0():
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "dry-run: ok" in res.stdout
    assert "[timeout] selftest_slow" in res.stdout  # the time box stops an overrunning step


def test_gpu_check_refuses_bad_arguments():
    from bench.gpu.check import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--only", "exactness,nonsense"])
    with pytest.raises(SystemExit):
        parse_args(["--budget-s", "0"])
    assert parse_args(["--only", "ring, main_job"]).steps == ["ring", "main_job"]


def test_result_writer_round_trips(tmp_path):
    from bench.gpu.results import StepResult, markdown_table, read_results, write_results

    steps = [StepResult("a", "ok", "fine", 1.25, tables={"t": [{"x": 1, "y": 0.5}, {"x": 2, "z": None}]}),
             StepResult("b", "timeout", "stopped", 3.0)]
    write_results(tmp_path, steps, {"device": "test"})
    meta, back = read_results(tmp_path)
    assert meta == {"device": "test"} and back == steps
    assert markdown_table([{"x": 1, "y": 0.5}, {"x": 2, "z": None}]).splitlines()[2:] == ["| 1 | 0.5 | n/a |", "| 2 | n/a | n/a |"]
    with pytest.raises(ValueError):
        StepResult("c", "maybe", "x")


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_fp64_reference_equals_full_attention(causal):
    """The check's reference (query-row chunks of the reference twin) equals full attention."""
    from bench.gpu.common import packed_inputs, reference_fp64
    from hetsp.attention.kernels.reference import varlen_attention_ref

    lengths = [1, 7, 20]
    q, k, v, do = packed_inputs(lengths, 4, 2, 8, torch.float64, "cpu", seed=3)
    got = reference_fp64(q, k, v, do, lengths, causal, 0.3, rows_per_chunk=6)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = varlen_attention_ref(*leaves, [0, 1, 8, 28], causal=causal, softmax_scale=0.3)
    want = (out, *torch.autograd.grad(out, leaves, do))
    # both fp64, same formulas in a different order: rounding only
    for a, b in zip((got[0], *got[2:]), want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_closeness_is_one_at_the_tolerance_edge():
    from bench.gpu.common import closeness

    want = torch.tensor([1.0, -2.0, 0.0])
    rtol = 0.01
    atol = rtol * want.pow(2).mean().sqrt().item()
    assert closeness(want, want, rtol) == 0.0
    edge = want + torch.tensor([0.0, 0.0, atol])
    assert closeness(edge, want, rtol) == pytest.approx(1.0)


def test_main_job_corpus_without_datasets_matches_datasets():
    """The main-job step's stdlib reader gives the same tokens and offsets as the datasets path."""
    pytest.importorskip("datasets")
    from bench.gpu.main_job import stdlib_texts, tokenize_texts
    from hetsp.config import DataConfig
    from hetsp.data.corpus import tokenize_dataset
    from hetsp.data.sources import load_documents
    from hetsp.data.tokenizer import load_tokenizer

    data = DataConfig(dataset="stdlib", tokenizer="bytes", max_documents=40)
    tok = load_tokenizer("bytes")
    want_tokens, want_offsets, _ = tokenize_dataset(load_documents(data), tok, data)
    tokens, offsets, _ = tokenize_texts(stdlib_texts(data), tok, data)
    assert tokens.dtype == want_tokens.dtype
    assert (offsets == want_offsets).all() and (tokens == want_tokens).all()
    with pytest.raises(ValueError, match="only 'stdlib'"):
        stdlib_texts(DataConfig(dataset="some/hub_name"))


def test_kernel_for_config_builds_triton_tiles_and_refuses_misuse():
    from hetsp.attention.kernels import kernel_for_config
    from hetsp.config import AttentionConfig

    assert kernel_for_config(AttentionConfig(), "cpu") == "auto"
    with pytest.raises(ValueError, match="triton_block"):
        kernel_for_config(AttentionConfig(kernel="torch_cpu", triton_block_m=64, triton_block_n=64), "cpu")


def test_triton_tiles_are_checked():
    pytest.importorskip("triton")
    from hetsp.attention.kernels.triton_kernel import TRITON_KERNEL, triton_kernel

    assert triton_kernel() is TRITON_KERNEL
    for bad in ((48, 64), (8, 16), (64, None)):
        with pytest.raises(ValueError):
            triton_kernel(*bad)


_TILES_SCRIPT = """
import torch
from tests.attn_fns import kernel_vs_reference
from hetsp.attention.kernels.triton_kernel import triton_kernel
# fp32 kernels on O(1) randn inputs: round-off 6e-8 per operation over at most 40 keys
tol = dict(atol=1e-5, rtol=1e-5)
for tiles in ((16, 32), (32, 16), (128, 16)):
    rep = kernel_vs_reference(triton_kernel(*tiles), "cpu", torch.float32, tol, sizes=((3, 5), (40, 33), (1, 1)))
    bad = [(lab, e) for lab, e in rep if not e <= 1]
    assert not bad, (tiles, bad)
print("ok")
"""


def test_triton_kernel_with_other_tiles_matches_reference_under_the_interpreter():
    """Other tile sizes (the check's candidates, smaller here) give the reference's results."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", _TILES_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def test_library_kernels_refuse_cpu():
    from hetsp.attention.kernels import select_kernel

    with pytest.raises(ValueError, match="torch_flash"):
        select_kernel("torch_flash", "cpu")


@pytest.mark.parametrize("causal", [True, False])
def test_exactness_step_logic_on_cpu(causal):
    """The exactness step's comparison, run with the CPU kernel: within the fp32 tolerance."""
    from bench.gpu.exactness import check_case

    res = check_case("torch_cpu", (1, 5, 33), 4, 2, 16, torch.float32, causal, device="cpu")
    assert set(res) == {"out", "lse", "dq", "dk", "dv"}
    assert max(res.values()) <= 1.0, res


def test_ring_step_logic_on_cpu_ranks():
    """The ring step's shard-versus-one-process comparison on 2 gloo CPU ranks (CPU kernel)."""
    from bench.gpu.ring import one_process, rank_run, worst_error
    from hetsp.testing import get_pool

    shape = dict(heads=4, kv_heads=2, dim=16)
    lengths = (37, 5, 1)
    per_rank = get_pool(2).run(rank_run, lengths, 1, "cpu", "torch_cpu", shape, "float32")
    full, _ = one_process(lengths, 1, "cpu", "torch_cpu", shape, "float32")
    assert worst_error(per_rank, full) <= 1.0
    per_rank[0]["shard"][0][0] += 1.0  # a wrong row must be seen
    assert worst_error(per_rank, full) > 1.0


def test_ssd_step_logic_on_cpu():
    """The ssd step's comparison (outputs, final states, every gradient) with hetsp's CPU scan."""
    from bench.gpu.throughput import ssd_exactness
    from models.kernels.ssd import ssd_chunk_scan

    shape = dict(heads=4, head_dim=8, groups=2, state=8)
    res = ssd_exactness(ssd_chunk_scan, (1, 5, 70), torch.float32, device="cpu", shape=shape)
    assert set(res) == {"y", "final", "dx", "ddt", "dA", "dB", "dC", "dinit"}
    assert max(res.values()) <= 1.0, res


def test_main_job_summary_reads_the_metrics(tmp_path):
    import json

    from bench.gpu.main_job import summarize

    rows = [{"kind": "train", "step": i, "loss": 5.0 - i, "tokens": 100, "step_time_s": 0.5, "peak_mem_bytes": 2**30 * (i + 1)}
            for i in range(4)] + [{"kind": "eval", "step": 3, "val_loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(tmp_path)
    assert s["steps"] == 4 and s["loss_first"] == 5.0 and s["loss_last"] == 2.0
    assert s["tokens_per_s"] == pytest.approx(200.0) and s["peak_mem_gib"] == pytest.approx(4.0)


def test_choice_keeps_hetsp_kernels_unless_a_library_one_is_exact_and_faster():
    from bench.gpu.check import choices
    from bench.gpu.results import StepResult

    def steps(flash_ok, flash_tf):
        exact = StepResult("exactness", "ok", "", tables={"kernels vs fp64": [
            {"case": "triton bfloat16 causal=True", "ok": True}, {"case": "torch_flash bfloat16 causal=True", "ok": flash_ok}]})
        speed = StepResult("throughput", "ok", "", tables={"attention fwd+bwd, causal, bf16": [
            {"kernel": "triton", "tokens": 4096, "tflops": 200.0}, {"kernel": "torch_flash", "tokens": 4096, "tflops": flash_tf},
            {"kernel": "triton", "tokens": 65536, "tflops": 400.0}, {"kernel": "torch_flash", "tokens": 65536, "error": "x"}]})
        return [exact, speed]

    assert 'attention.kernel="torch_flash"' in choices(steps(True, 300.0))[0]
    assert "keep the Triton kernel" in choices(steps(False, 300.0))[0]
    assert "keep the Triton kernel" in choices(steps(True, 100.0))[0]
    assert "not decided" in choices([])[0]


def test_ssd_kernel_option_defaults_to_hetsp_and_is_checked():
    from models.kernels import ssd_chunk_scan
    from models.kernels.ssd_fla import ssd_chunk_scan_fla
    from models import HybridForCausalLM

    from .test_models import tiny_config

    assert tiny_config(layer_pattern="mamba2").ssd_kernel == "hetsp"
    with pytest.raises(ValueError, match="ssd_kernel"):
        tiny_config(layer_pattern="mamba2", ssd_kernel="other")
    model = HybridForCausalLM(tiny_config(layer_pattern="mamba2"))
    assert model.model.layers[0].mixer.kernels["ssd_scan"] is ssd_chunk_scan
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="CUDA"):
        ssd_chunk_scan_fla(x, torch.rand(1, 4, 2), -torch.rand(2), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8))


def test_build_data_without_datasets_gives_the_same_batches(monkeypatch):
    """`build_data` pointed at the main-job step's readers serves the same global batches."""
    pytest.importorskip("datasets")
    import hetsp.data.module as module
    from bench.gpu.main_job import use_datasets_free_corpus
    from hetsp.config import DataConfig

    data = DataConfig(dataset="stdlib", tokenizer="bytes", max_documents=60, max_seq_len=512, tokens_per_batch=2048)
    want = module.build_data(data, seed=1)
    for name in ("load_documents", "tokenize_dataset"):  # restored after the test
        monkeypatch.setattr(module, name, getattr(module, name))
    use_datasets_free_corpus()
    got = module.build_data(data, seed=1)
    timings = ("tokenize_seconds", "build_seconds")
    assert {k: v for k, v in got.stats.items() if k not in timings} == {k: v for k, v in want.stats.items() if k not in timings}
    for step in (0, 3):
        assert got.train_batch(step) == want.train_batch(step)
    assert got.val_batches(2) == want.val_batches(2)


def test_wheel_unpacks_without_pip(tmp_path):
    from bench.gpu.install import make_wheel, unpack

    unpack(make_wheel(tmp_path / "w"), tmp_path / "site")
    assert (tmp_path / "site" / "hetsp_gpu_check_probe.py").read_text() == "VALUE = 42\n"


def test_config_checks_refuse_bad_triton_tiles_before_any_rank_starts():
    from hetsp.checks import check_attention
    from hetsp.config import ConfigError, load_config

    for sets, match in ((["attention.triton_block_m=48", "attention.triton_block_n=64"], "power of two"),
                        (["attention.triton_block_m=64"], "both or neither"),
                        (['attention.kernel="torch_cpu"', "attention.triton_block_m=64", "attention.triton_block_n=64"], "kernel")):
        with pytest.raises(ConfigError, match=match):
            check_attention(load_config(ROOT / "configs" / "default.toml", sets))
    check_attention(load_config(ROOT / "configs" / "default.toml", ["attention.triton_block_m=128", "attention.triton_block_n=64"]))


# GPU tests (skipped without CUDA; `bench/gpu_check.sh` runs them in its `tests` step).
_BF16 = dict(atol=2e-2, rtol=2e-2)  # unit round-off 4e-3 on O(1) values, a few roundings deep


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["torch_flash", "triton_128x64", "triton_64x128"])
def test_cuda_library_kernel_and_tiles_match_reference(kernel):
    from hetsp.attention.kernels.triton_kernel import triton_kernel

    from .attn_fns import kernel_vs_reference

    if kernel.startswith("triton_"):
        kernel = triton_kernel(*map(int, kernel.split("_")[1].split("x")))
    sizes = ((300, 300), (1, 1), (129, 517), (1000, 1000))
    report = kernel_vs_reference(kernel, "cuda", torch.bfloat16, _BF16, sizes=sizes, heads=(8, 2), dim=128)
    bad = [(lab, e) for lab, e in report if not e <= 1]
    assert not bad, bad


@pytest.mark.gpu
def test_fla_ssd_scan_matches_the_fp64_twin():
    pytest.importorskip("fla")
    from bench.gpu.throughput import ssd_exactness
    from models.kernels.ssd_fla import ssd_chunk_scan_fla

    shape = dict(heads=4, head_dim=64, groups=2, state=64)
    res = ssd_exactness(ssd_chunk_scan_fla, (1, 5, 64, 200), torch.float32, device="cuda", shape=shape)
    assert max(res.values()) <= 1.0, res
