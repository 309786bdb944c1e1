"""Offline CoPG data: TRL's pair and k-completion formats, and the inputs they refuse."""

import json

import pytest

from hetsp.data.preference import bundle_batches, preference_examples, read_rows
from hetsp.data.tokenizer import ByteTokenizer
from hetsp.objectives.config import CoPGObjectiveConfig


def test_pair_and_k_formats(tmp_path):
    rows = [
        {"prompt": "ab", "chosen": "cd", "rejected": "e", "score_chosen": 2.0, "score_rejected": -1},
        {"prompt": "x", "chosen": "yy", "rejected": "z"},
        {"prompt": "q", "completions": ["r", "st", "u"], "rewards": [0.1, 0.5, -0.2]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = preference_examples(read_rows(path), ByteTokenizer(), CoPGObjectiveConfig())
    ex = data.examples
    assert [e.bundle for e in ex] == [0, 0, 1, 1, 2, 2, 2]
    assert [e.reward for e in ex] == [2.0, -1.0, 0.25, -0.25, 0.1, 0.5, -0.2]
    tok = ByteTokenizer()
    assert ex[0].tokens == tuple(tok.encode("ab") + tok.encode("cd")) and ex[0].prompt_len == 2
    assert bundle_batches(ex, 2) == [[0, 1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("row,msg", [
    ({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
    ({"chosen": "b", "rejected": "c"}, "missing field 'prompt'"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 1.0}, "both score_chosen and score_rejected"),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, "completion 0 has no tokens"),
    ({"prompt": "a", "completions": ["b"], "rewards": [1.0]}, "a bundle of 1"),
    ({"prompt": "a", "completions": ["b", "c"], "rewards": [1.0, float("nan")]}, "finite number"),
])
def test_bad_rows_are_named(row, msg):
    with pytest.raises(ValueError, match=msg):
        preference_examples([{"prompt": "ok", "chosen": "a", "rejected": "b"}, row], ByteTokenizer(), CoPGObjectiveConfig())


def test_long_prompts_dropped_with_a_count_or_truncated_from_the_left():
    rows = [{"prompt": "abcdef", "chosen": "x", "rejected": "y"}, {"prompt": "ab", "chosen": "x", "rejected": "y"}]
    drop = preference_examples(rows, ByteTokenizer(), CoPGObjectiveConfig(max_prompt_tokens=3))
    assert drop.num_dropped_long_prompt == 1 and [e.bundle for e in drop.examples] == [1, 1]
    cut = preference_examples(rows, ByteTokenizer(), CoPGObjectiveConfig(max_prompt_tokens=3, long_prompt="truncate_left"))
    tok = ByteTokenizer()
    assert cut.num_truncated_prompt == 1 and cut.examples[0].tokens[:3] == tuple(tok.encode("def"))
