"""Data pipeline: determinism by (seed, step), token budgets, long-document policy, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import numpy as np
import pytest

from hetsp.config import DataConfig
from hetsp.data import build_data
from hetsp.data.batching import EpochSchedule, cut_by_budget


def write_jsonl(path, texts, field="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t, "id": len(t)}) + "\n")
    return path


def corpus_texts(num=60, seed=0):
    """Long-tailed document lengths from 0 to ~300 characters (ASCII: one byte token each)."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.pareto(1.2, num) * 20, 300).astype(int)
    return ["".join(chr(c) for c in rng.integers(97, 123, n)) for n in lengths]


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", corpus_texts())


def small_config(path, **kw):
    base = dict(dataset=str(path), max_seq_len=64, tokens_per_batch=200, validation_fraction=0.1)
    base.update(kw)
    return DataConfig(**base)


def batch_digest(dm, steps):
    h = hashlib.sha256()
    for s in steps:
        h.update(json.dumps(dm.train_batch(s)).encode())
    return h.hexdigest()


def rank_batch_digest(cfg_dict, seed, steps):
    """Runs on every rank of a pool: each builds its own DataModule and hashes its batches."""
    dm = build_data(DataConfig(**cfg_dict), seed)
    return batch_digest(dm, steps)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_and_budget(jsonl_corpus):
    cfg = small_config(jsonl_corpus)
    a, b = build_data(cfg, seed=3), build_data(cfg, seed=3)
    steps = range(40)
    assert a.epoch_of(39) >= 1, "the test should cross an epoch boundary"
    for s in steps:
        batch = a.train_batch(s)
        assert batch == b.train_batch(s)
        assert batch, f"step {s}: empty batch"
        assert sum(map(len, batch)) <= cfg.tokens_per_batch
        assert all(2 <= len(seq) <= cfg.max_seq_len for seq in batch)
        assert all(seq[-1] == a.tokenizer.eos_token_id or len(seq) == cfg.max_seq_len for seq in batch)
        assert [len(x) for x in batch] == a.train_batch_lengths(s)
    c = build_data(cfg, seed=4)
    assert batch_digest(a, steps) != batch_digest(c, steps)


def test_random_access_needs_no_replay(jsonl_corpus):
    cfg = small_config(jsonl_corpus)
    seq = build_data(cfg, seed=0)
    expected = [seq.train_batch(s) for s in range(30)]
    fresh = build_data(cfg, seed=0)
    for s in [29, 3, 17, 0, 29]:
        assert fresh.train_batch(s) == expected[s]
    epochs = [seq.epoch_of(s) for s in range(30)]
    assert epochs == sorted(epochs) and epochs[0] == 0


def test_each_epoch_visits_every_training_sequence_once(jsonl_corpus):
    dm = build_data(small_config(jsonl_corpus), seed=1)
    for epoch in (0, 1):
        steps = [s for s in range(60) if dm.epoch_of(s) == epoch]
        seen = sorted(tuple(x) for s in steps for x in dm.train_batch(s))
        everything = sorted(tuple(dm.train.get(i)) for i in range(len(dm.train)))
        assert seen == everything


def test_batches_identical_across_ranks(jsonl_corpus, rank_pool):
    cfg = small_config(jsonl_corpus)
    steps = list(range(25))
    local = batch_digest(build_data(cfg, seed=7), steps)
    digests = rank_pool(2).run(rank_batch_digest, dataclasses.asdict(cfg), 7, steps)
    assert digests == [local, local]


def test_cut_by_budget_is_greedy_and_bounded():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 50, 500)
    bounds = cut_by_budget(lengths, 120)
    assert bounds[0] == 0 and bounds[-1] == 500
    sums = [lengths[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    assert max(sums) <= 120 and min(np.diff(bounds)) >= 1
    # greedy: the next sequence would not have fit into the previous batch
    for k, b in enumerate(bounds[1:-1]):
        assert sums[k] + lengths[b] > 120
    sched = EpochSchedule(lengths, 120, seed=0)
    assert sched.batches_in_epoch(0) == len(cut_by_budget(lengths[np.random.default_rng([0, 0]).permutation(500)], 120)) - 1


# --------------------------------------------------------------------------- corpus shape


def test_long_policy_counts(tmp_path, caplog):
    # 4 short docs (<= 9 tokens with eos), 2 long ones: 25 and 40 characters (+ eos)
    texts = ["abc", "hello", "", "xy", "12345678", "a" * 25, "b" * 40, ""]
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    with caplog.at_level(logging.INFO, logger="hetsp.data"):
        split = build_data(small_config(path, max_seq_len=10, tokens_per_batch=30, validation_fraction=0), 0)
    s = split.stats
    assert s["documents"] == 8 and s["empty_skipped"] == 2
    assert s["long_documents"] == 2 and s["long_split"] == 2 and s["long_dropped"] == 0
    assert s["split_pieces"] == 3 + 4  # 26 tokens -> 10+10+6; 41 -> 10*4 + a 1-token tail
    assert s["tail_tokens_dropped"] == 1
    assert s["train_sequences"] == 4 + 7
    assert s["tokens"] == (4 + 6 + 3 + 9) + 26 + 40
    assert any("split into 7 pieces" in r.getMessage() for r in caplog.records)

    drop = build_data(small_config(path, max_seq_len=10, tokens_per_batch=30, validation_fraction=0,
                                   long_policy="drop"), 0)
    d = drop.stats
    assert d["long_dropped"] == 2 and d["long_split"] == 0 and d["long_dropped_tokens"] == 26 + 41
    assert d["train_sequences"] == 4 and d["tokens"] == 4 + 6 + 3 + 9
    assert sorted(drop.tokenizer.decode(drop.train.get(i)) for i in range(4)) == sorted(["abc", "hello", "xy", "12345678"])


def test_bos_option(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["abc", "de"])
    dm = build_data(small_config(path, max_seq_len=8, tokens_per_batch=8, validation_fraction=0, add_bos=True), 0)
    tok = dm.tokenizer
    seqs = sorted(dm.train.get(i) for i in range(len(dm.train)))
    assert seqs == sorted([[tok.bos_token_id, 97, 98, 99, tok.eos_token_id], [tok.bos_token_id, 100, 101, tok.eos_token_id]])


def test_validation_split_disjoint_and_fixed(jsonl_corpus):
    cfg = small_config(jsonl_corpus, validation_fraction=0.2)
    a, b = build_data(cfg, seed=0), build_data(cfg, seed=5)
    s = a.stats
    assert s["val_documents"] == round(0.2 * (s["documents"] - s["empty_skipped"]))
    assert s["train_documents"] + s["val_documents"] == s["documents"] - s["empty_skipped"]
    val = a.val_batches(100)
    assert val and len(val) == a.num_val_batches
    assert val == b.val_batches(100), "the held-out split must not depend on the run seed"
    val_docs, train_docs = set(a.val.documents.tolist()), set(a.train.documents.tolist())
    assert len(val_docs) == s["val_documents"] and len(train_docs) == s["train_documents"]
    assert not (val_docs & train_docs)
    # every held-out batch sequence is one of the held-out documents' sequences, none a training one
    val_seqs = [tuple(x) for batch in val for x in batch]
    assert sorted(val_seqs) == sorted(tuple(a.val.get(i)) for i in range(len(a.val)))
    train_seqs = {tuple(a.train.get(i)) for i in range(len(a.train))}
    assert not (set(val_seqs) & train_seqs)
    for batch in val:
        assert sum(map(len, batch)) <= cfg.tokens_per_batch
    assert len(a.val_batches(1)) == 1


def test_local_text_folder_one_document_per_file(tmp_path):
    for i, t in enumerate(["first file\nwith two lines", "second", "third one"]):
        (tmp_path / f"{i}.txt").write_text(t)
    dm = build_data(small_config(tmp_path, validation_fraction=0), 0)
    assert dm.stats["documents"] == 3
    texts = sorted(dm.tokenizer.decode(dm.train.get(i)) for i in range(3))
    assert texts == sorted(["first file\nwith two lines", "second", "third one"])


def test_parquet_source(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"body": ["one doc", "two docs", "three"]}).to_parquet(str(tmp_path / "c.parquet"))
    dm = build_data(small_config(tmp_path / "c.parquet", text_field="body", validation_fraction=0), 0)
    assert dm.stats["documents"] == 3 and dm.stats["train_tokens"] == 7 + 8 + 5 + 3


def test_local_transformers_tokenizer(tmp_path, jsonl_corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({chr(97 + i): 4 + i for i in range(26)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    dm = build_data(small_config(jsonl_corpus, tokenizer=str(tmp_path / "tok")), 0)
    assert dm.vocab_size == 30 and dm.tokenizer.eos_token_id == 2
    assert dm.tokenizer.encode("abc") == [4, 5, 6]
    batch = dm.train_batch(0)
    assert all(seq[-1] == 2 or len(seq) == 64 for seq in batch)


@pytest.mark.timeout(120)
def test_stdlib_corpus_loads():
    dm = build_data(DataConfig(max_documents=40, max_seq_len=512, tokens_per_batch=2048), seed=0)
    s = dm.stats
    assert s["documents"] == 40 and s["tokens"] > 10_000
    assert dm.vocab_size == 259
    batch = dm.train_batch(0)
    assert sum(map(len, batch)) <= 2048 and all(2 <= len(x) <= 512 for x in batch)
    text = dm.tokenizer.decode(batch[0])
    assert text.isprintable() or "\n" in text


def test_stdlib_files_sorted_and_excluding_site_packages():
    from hetsp.data.sources import stdlib_files

    _, files = stdlib_files()
    assert len(files) > 500 and files == sorted(files)
    assert not any("site-packages" in f or "dist-packages" in f for f in files)
    assert all(f.endswith(".py") for f in files)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(dataset="/no/such/corpus.jsonl"), "no such file or folder"),
        (dict(text_field="content"), r"available fields: \['text', 'id'\]|available fields: \['id', 'text'\]"),
        (dict(text_field="id"), "not text"),
        (dict(tokenizer="/no/such/tokenizer"), "no such folder"),
        (dict(tokens_per_batch=32, max_seq_len=64), "smallest budget that works is tokens_per_batch = 64"),
        (dict(max_seq_len=1), "at least 2 tokens"),
        (dict(validation_fraction=1.0), "validation_fraction"),
    ],
)
def test_bad_input_is_a_clear_value_error(jsonl_corpus, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_data(small_config(jsonl_corpus, **overrides), 0)


def test_unloadable_tokenizer_folder(tmp_path, jsonl_corpus):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load a transformers tokenizer"):
        build_data(small_config(jsonl_corpus, tokenizer=str(tmp_path / "tok")), 0)


def test_empty_corpus(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "", ""])
    with pytest.raises(ValueError, match="all 3 documents .* are empty"):
        build_data(small_config(path), 0)


def test_zero_byte_file(tmp_path):
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(ValueError, match="corpus is empty"):
        build_data(small_config(tmp_path / "none.jsonl"), 0)


@pytest.mark.parametrize("sample_by", ["document", "paragraph", "line"])
def test_text_file_of_empty_lines_is_not_a_corpus(tmp_path, sample_by):
    (tmp_path / "blank.txt").write_text("\n\n  \n\t\n\n")
    with pytest.raises(ValueError, match="no text"):
        build_data(small_config(tmp_path / "blank.txt", text_sample_by=sample_by), 0)


def test_everything_dropped(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", ["x" * 100, "y" * 200])
    with pytest.raises(ValueError, match="no training sequences left"):
        build_data(small_config(path, long_policy="drop", validation_fraction=0), 0)


def test_concurrent_access_matches_sequential(jsonl_corpus):
    from concurrent.futures import ThreadPoolExecutor

    cfg = small_config(jsonl_corpus, tokens_per_batch=64)
    reference = build_data(cfg, seed=2)
    expected = [reference.train_batch(s) for s in range(80)]
    dm = build_data(cfg, seed=2)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(dm.train_batch, [79 - s if s % 2 else s for s in range(80)]))
    assert got == [expected[79 - s if s % 2 else s] for s in range(80)]


def test_unreachable_hub_fails_fast(monkeypatch, jsonl_corpus):
    # a closed local port stands in for the hub: no network traffic leaves the machine
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="is not a local path"):
        build_data(small_config(jsonl_corpus, dataset="someone/corpus_name"), 0)


def test_empty_validation_split_is_allowed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["only one document"])
    dm = build_data(small_config(path, validation_fraction=0.5), 0)
    assert dm.stats["val_documents"] == 0 and dm.val_batches(2) == []
    assert dm.train_batch(0) == dm.train_batch(1)  # one sequence: every epoch is that one batch
