"""Metrics: the run folder's JSONL files, resume truncation, summary, FLOPs/MFU, and hetsp-plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hetsp.metrics import MetricsLogger, format_group_sizes, summarize
from hetsp.metrics.flops import ModelFlops, mfu, model_flops_per_token, peak_flops
from hetsp.metrics.jsonl import read_jsonl
from hetsp.metrics.plot import main as plot_main
from hetsp.plan import Group, MicroBatch, Plan

from . import metrics_fns


def _record(step: int, **extra):
    rec = {"loss": 5.0 - 0.1 * step, "lr": 1e-3, "tokens": 1000, "step_time_s": 0.5, "plan_time_s": 0.05,
           "num_micro_batches": 2, "group_sizes": {1: 6, 2: 1}}
    rec.update(extra)
    return rec


def _plan(step: int) -> Plan:
    return Plan((10 + step, 7), (MicroBatch((Group(0, 1, (0,)), Group(1, 1, (1,)))),), {"planner": "test"})


def _run(run_dir, steps, start=0, total=None, **kw):
    logger = MetricsLogger(run_dir, True, total or steps, start_step=start, progress="off", **kw)
    for s in range(start, steps):
        logger.log_step(s, _record(s))
        logger.log_plan(s, _plan(s))
        if s % 5 == 4:
            logger.log_eval(s, 4.0 - 0.1 * s)
    return logger


def test_step_records_and_derived_rates(tmp_path):
    logger = MetricsLogger(tmp_path, True, 3, world_size=4, peak_flops_per_rank=1e12, progress="off")
    out = logger.log_step(0, _record(0, model_flops=2e12))
    logger.log_step(1, _record(1))
    logger.close()
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [0, 1]
    assert lines[0] == out
    assert lines[0]["tokens_per_s"] == pytest.approx(2000.0)
    assert lines[0]["tokens_per_s_per_rank"] == pytest.approx(500.0)
    assert lines[0]["mfu"] == pytest.approx(2e12 / 0.5 / (4 * 1e12))
    assert "mfu" not in lines[1]  # no model FLOPs given: no MFU
    assert lines[0]["group_sizes"] == {"1": 6, "2": 1}


def test_no_mfu_without_peak(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, True, 1, progress="off")
    assert "mfu" not in logger.log_step(0, _record(0, model_flops=1e12))
    logger.close()
    assert "MFU" not in capsys.readouterr().out


def test_plans_round_trip(tmp_path):
    _run(tmp_path, 3).close()
    lines = read_jsonl(tmp_path / "plans.jsonl")
    assert [line["step"] for line in lines] == [0, 1, 2]
    for line in lines:
        assert Plan.from_dict(line["plan"]) == _plan(line["step"])


def test_only_rank0_writes(tmp_path):
    logger = MetricsLogger(tmp_path / "r1", False, 2, progress="off")
    assert logger.log_step(0, _record(0)) is None
    logger.log_plan(0, _plan(0))
    logger.log_eval(0, 1.0)
    assert logger.close() is None
    assert not (tmp_path / "r1").exists()


def test_resume_drops_replayed_steps(tmp_path):
    _run(tmp_path, 10).close()
    # A crash left half a line at the end: it must not break the resume.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 10, "lo')
    logger = _run(tmp_path, 12, start=6, total=12)
    summary = logger.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    eval_steps = [r["step"] for r in records if r["kind"] == "eval"]
    assert train_steps == list(range(12))
    assert eval_steps == [4, 9]
    assert [line["step"] for line in read_jsonl(tmp_path / "plans.jsonl")] == list(range(12))
    assert summary["steps"] == 12 and summary["tokens"] == 12000


def test_malformed_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(tmp_path / "metrics.jsonl")


def test_summary_values_and_table(tmp_path, capsys):
    summary = _run(tmp_path, 10, world_size=2).close()
    losses = [5.0 - 0.1 * s for s in range(10)]
    assert summary["steps"] == 10
    assert summary["tokens"] == 10000
    assert summary["mean_loss"] == pytest.approx(sum(losses) / 10)
    assert summary["last_loss"] == pytest.approx(losses[-1])
    assert summary["best_val_loss"] == pytest.approx(4.0 - 0.9)
    assert summary["tokens_per_s"] == pytest.approx(2000.0)
    assert summary["tokens_per_s_per_rank"] == pytest.approx(1000.0)
    assert summary["plan_time_share"] == pytest.approx(0.1)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    table = capsys.readouterr().out
    assert "tokens/s (per rank)" in table and "10.0%" in table and "3.1000" in table


def test_summary_peak_memory_and_nan(tmp_path):
    logger = MetricsLogger(tmp_path, True, 2, progress="off")
    logger.log_step(0, _record(0, peak_mem_bytes=100, grad_norm=float("nan")))
    logger.log_step(1, _record(1, peak_mem_bytes=300))
    logger.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[0]["grad_norm"] is None  # NaN is written as null, readable by any JSON parser
    assert summarize(records, 1)["peak_mem_bytes"] == 300


def test_world_size_from_the_process_group(rank_pool, tmp_path):
    results = rank_pool(2).run(metrics_fns.log_one_step, str(tmp_path))
    assert results == [(2, True), (2, False)]
    (line,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert line["tokens_per_s_per_rank"] == pytest.approx(150.0)


def test_comm_and_data_shares(tmp_path, capsys):
    logger = MetricsLogger(tmp_path / "a", True, 1, world_size=1, progress="off")
    logger.log_step(0, _record(0))
    summary = logger.close()
    assert summary["comm_time_share"] is None and summary["data_time_share"] is None
    table = capsys.readouterr().out
    assert "communication" not in table and "data loading" not in table
    logger = MetricsLogger(tmp_path / "b", True, 2, world_size=1, progress="off")
    logger.log_step(0, _record(0, comm_s=0.1, data_s=0.05))
    logger.log_step(1, _record(1, comm_s=0.1, data_s=0.05))
    summary = logger.close()
    assert summary["comm_time_share"] == pytest.approx(0.2)
    assert summary["data_time_share"] == pytest.approx(0.1)
    assert "communication time share |  20.0%" in capsys.readouterr().out


def test_exchange_wait_time_is_accumulated(rank_pool):
    """Exchange.wait adds its blocked time to the process's COMM_WAIT (the source of comm_s)."""
    for before, after, _ in rank_pool(2).run(metrics_fns.exchange_wait_is_counted):
        assert before == 0.0 and after > 0.0


def test_blocked_time_sums_over_threads():
    import threading

    from hetsp.metrics.timing import BlockedTime

    acc = BlockedTime()

    def work():
        for _ in range(100):
            with acc.measure():
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert acc.total() > 0
    acc.reset()
    assert acc.total() == 0.0


def test_progress_lines(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, True, 4, progress="lines", print_every=2)
    for s in range(4):
        logger.log_step(s, _record(s, plan_time_s=0.0031))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].startswith("step 1 (2/4)")
    assert "groups 1x6 2x1" in out[0] and "plan 3.1 ms" in out[0] and "2.0k tok/s" in out[0]
    logger.close()


def test_progress_bar(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, True, 3, start_step=1, progress="bar")
    logger.log_step(1, _record(1))
    assert logger._bar.n == 2
    logger.close()


def test_format_group_sizes():
    assert format_group_sizes({2: 1, 1: 6}) == "1x6 2x1"
    assert format_group_sizes({"4": 2}) == "4x2"
    assert format_group_sizes({}) == "-"


# ----------------------------------------------------------------------------- FLOPs


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)


@pytest.mark.parametrize("tie", [False, True])
def test_model_flops_match_hand_count(tie):
    h, i, layers, heads, kv, vocab = 32, 48, 3, 4, 2, 50
    head_dim = h // heads
    per_layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * i + 2 * h
    n = layers * per_layer + h + vocab * h  # the output head; the input embedding is a lookup
    flops = ModelFlops.from_hf_config(_tiny_llama(tie))
    assert flops.dense_per_token == 6 * n
    assert flops.attn_per_token_per_ctx == 12 * layers * heads * head_dim
    assert model_flops_per_token(_tiny_llama(tie), 100) == 6 * n + 12 * layers * h * 100
    assert model_flops_per_token(1000, 100) == 6000
    assert flops.for_lengths([3, 5]) == pytest.approx(3 * flops.per_token(3) + 5 * flops.per_token(5))


def test_attention_layers_counted_once():
    import torch.nn as nn

    from hetsp.metrics.flops import _count_attention_modules

    class InnerAttention(nn.Module):
        pass

    class AttentionMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.core = InnerAttention()

    class Mamba2Mixer(nn.Module):
        pass

    layers = nn.ModuleList([Mamba2Mixer(), AttentionMixer(), Mamba2Mixer(), AttentionMixer(), Mamba2Mixer()])
    assert _count_attention_modules(nn.Sequential(layers)) == 2


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert peak_flops("NVIDIA H100 NVL") == 835.5e12
    assert peak_flops("NVIDIA H200") == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L40S") == 362.05e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA H100 80GB HBM3", dtype="fp32") is None
    assert peak_flops("Some Future Accelerator") is None
    assert peak_flops("cpu") is None
    assert peak_flops(None) is None


def test_mfu():
    assert mfu(4e12, 2.0, 2, 1e12) == pytest.approx(1.0)
    assert mfu(4e12, 2.0, 2, None) is None


def test_import_is_light():
    code = "import sys, hetsp.metrics; print(any(m in sys.modules for m in ('torch', 'matplotlib')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# ----------------------------------------------------------------------------- hetsp-plot


def test_plot_writes_pngs(tmp_path, capsys):
    _run(tmp_path / "run", 10, world_size=2, peak_flops_per_rank=1e9).close()
    assert plot_main([str(tmp_path / "run"), "--out", str(tmp_path / "png")]) == 0
    for name in ("loss.png", "throughput.png"):
        data = (tmp_path / "png" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_errors_name_the_problem(tmp_path, capsys):
    assert plot_main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert plot_main([str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_main([str(tmp_path)]) == 2
    assert "no training steps" in capsys.readouterr().err
