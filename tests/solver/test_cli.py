"""The inspection tool: good input gives tables/JSON/plots; bad input a clear message, exit 2, no traceback."""

import json
import subprocess
import sys

import pytest

from hetsp.plan import Group, MicroBatch, Plan
from solver.__main__ import main

FLEX = ["--cost-model", "flexsp", "--memory-gb", "30", "--group-sizes", "2,4,8,16,64", "--time-limit", "0.3"]


def _lengths(tmp_path, text, name="l.txt"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_json_and_plot(tmp_path, capsys):
    f = _lengths(tmp_path, "\n".join(str(100 * (k % 37) + 128) for k in range(120)) + "\n# a comment\n\n")
    png = tmp_path / "plan.png"
    assert main(["--lengths", f, "--ranks", "64", *FLEX, "--batch-size", "60", "--num-batches", "2", "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["batches"]) == 2
    rows = out["batches"][0]["planners"]
    assert {"milp", "static_max", "batch_adaptive", "greedy"} <= set(rows)
    for r in rows.values():
        assert r["est_s"] >= out["batches"][0]["lower_bound"]["total_s"] - 1e-9
    Plan.from_dict(out["batches"][0]["plan"]).validate(64)
    assert png.stat().st_size > 1000 and (tmp_path / "plan_1.png").exists()


def test_tables(tmp_path, capsys):
    f = _lengths(tmp_path, "5000\n300\n70000\n1200\n")
    assert main(["--lengths", f, "--ranks", "16", "--ranks-per-node", "8", *FLEX, "--planner", "greedy"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 0" in out and "lower bound" in out and "static" in out


def test_run_folder(tmp_path, capsys):
    plan = Plan((300, 4000, 20), (MicroBatch((Group(0, 2, (0, 1)), Group(2, 2, (2,)))),))
    lines = [json.dumps({"step": s, "plan": plan.to_dict()}) for s in (1, 2)]
    (tmp_path / "plans.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["--run", str(tmp_path), *FLEX, "--memory-gb", "80", "--step", "2", "--json", "--no-baselines"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_ranks"] == 4 and [b["batch"] for b in out["batches"]] == [2]
    rows = out["batches"][0]["planners"]
    assert rows["recorded"]["est_s"] >= out["batches"][0]["lower_bound"]["total_s"] - 1e-9
    assert rows["recorded"]["micro_batches"] == 1


def test_dataset_plans_the_training_runs_batches(tmp_path, capsys):
    """--dataset gives exactly the lengths a training run with the same data settings plans:
    the same pipeline (tokenizer, eos, bos, long-document split, held-out documents, token budget)."""
    from hetsp.config import load_config
    from hetsp.data import build_data

    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": "x" * (50 * k + 1)}) for k in range(40)))
    sets = ["data.max_seq_len=300", "data.tokens_per_batch=1200", "data.add_bos=true", "data.validation_fraction=0.1",
            "run.seed=5"]
    args = ["--dataset", str(p), "--ranks", "8", *FLEX, "--json", "--no-baselines", "--num-batches", "3"]
    assert main([*args, *sum((["--set", x] for x in sets), [])]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = load_config(None, [*sets, f"data.dataset='{p}'"])
    data = build_data(cfg.data, cfg.run.seed)
    assert [b["plan"]["lengths"] for b in out["batches"]] == [data.train_batch_lengths(k) for k in range(3)]
    assert max(max(b["plan"]["lengths"]) for b in out["batches"]) <= 300  # long documents split as in training
    assert main([*args, "--batch-size", "4"]) == 2
    assert "--batch-size change the lengths a training run plans" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, extra, msg",
    [
        ("100\n400000000\n", [], r"sequence 1 has 400000000 tokens but the longest that fits on 64 ranks .* is \d+"),
        ("", [], "holds no lengths"),
        ("100\n0\n", [], "line 2: length 0"),
        ("100\n-5\n", [], "line 2: length -5"),
        ("100\nabc\n", [], r"line 2: 'abc' is not an integer"),
        ("100\n", ["--ranks-per-node", "128"], r"ranks per node \(128\) is more than the 64 ranks"),
        ("100\n", ["--group-sizes", "2,x"], "--group-sizes"),
        ("100\n", ["--planner", "nope"], "unknown planner 'nope'"),
    ],
)
def test_bad_input(tmp_path, capsys, content, extra, msg):
    f = _lengths(tmp_path, content)
    code = main(["--lengths", f, "--ranks", "64", *FLEX, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    import re

    assert re.search(msg, err), err


def test_drop_long_counts(tmp_path, capsys):
    f = _lengths(tmp_path, "100\n400000000\n300\n")
    assert main(["--lengths", f, "--ranks", "64", *FLEX, "--drop-long", "--json", "--no-baselines"]) == 0
    plan = json.loads(capsys.readouterr().out)["batches"][0]["plan"]
    assert plan["num_inputs"] - len(plan["source_index"]) == 1 and plan["lengths"] == [100, 300]


def test_missing_file_exits_cleanly(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "solver", "--lengths", str(tmp_path / "none.txt"), "--ranks", "4"],
        capture_output=True, text=True,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
