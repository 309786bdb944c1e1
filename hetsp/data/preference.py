"""Offline CoPG data in TRL's formats, turned into scored completions grouped in bundles.

Two row formats (one per dataset; columns decide):

- pairs: ``prompt``, ``chosen``, ``rejected``; rewards from ``score_chosen`` and
  ``score_rejected`` when both are present, else `objective.reward_pair`
  (default +1/4 and -1/4, which makes CoPG's gradient IPO's up to 2 beta);
- k completions: ``prompt``, ``completions`` (list of texts), ``rewards`` (list of numbers).

Every row becomes one bundle (its id is the row number). A prompt longer than
`objective.max_prompt_tokens` is dropped (counted) or truncated from the left.
Anything missing or malformed is an error naming the row and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from hetsp.objectives.config import CoPGObjectiveConfig
from hetsp.objectives.copg import ScoredCompletion


@dataclass
class PreferenceData:
    examples: list[ScoredCompletion]
    num_rows: int
    num_dropped_long_prompt: int
    num_truncated_prompt: int


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl / .json (a list of objects) / .parquet file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"preference data {p} does not exist")
    if p.suffix == ".jsonl":
        rows = []
        for k, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}, line {k}: not JSON ({e})") from None
        return rows
    if p.suffix == ".json":
        rows = json.loads(p.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{p}: expected a JSON list of rows")
        return rows
    if p.suffix == ".parquet":
        import datasets

        return list(datasets.load_dataset("parquet", data_files=str(p), split="train"))
    raise ValueError(f"preference data {p}: use .jsonl, .json or .parquet")


def _text(row: dict, field: str, k: int) -> str:
    if field not in row or row[field] is None:
        raise ValueError(f"preference row {k}: missing field {field!r} (has {sorted(row)})")
    if not isinstance(row[field], str):
        raise ValueError(f"preference row {k}: field {field!r} must be text, got {type(row[field]).__name__}")
    return row[field]


def _number(x: Any, what: str, k: int) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"preference row {k}: {what} must be a finite number, got {x!r}")
    return float(x)


def row_completions(row: dict, k: int, cfg: CoPGObjectiveConfig) -> tuple[str, list[str], list[float]]:
    """(prompt, completion texts, rewards) of one row in either format."""
    prompt = _text(row, "prompt", k)
    if "completions" in row or "rewards" in row:
        comps, rewards = row.get("completions"), row.get("rewards")
        if not isinstance(comps, list) or not isinstance(rewards, list):
            raise ValueError(f"preference row {k}: 'completions' and 'rewards' must both be lists")
        if len(comps) != len(rewards):
            raise ValueError(f"preference row {k}: {len(comps)} completions but {len(rewards)} rewards")
        if len(comps) < 2:
            raise ValueError(f"preference row {k}: a bundle of {len(comps)} completion(s); CoPG needs two or more")
        texts = [_text({"completions": c}, "completions", k) for c in comps]
        return prompt, texts, [_number(r, f"rewards[{i}]", k) for i, r in enumerate(rewards)]
    chosen, rejected = _text(row, "chosen", k), _text(row, "rejected", k)
    has = ("score_chosen" in row, "score_rejected" in row)
    if any(has) and not all(has):
        raise ValueError(f"preference row {k}: give both score_chosen and score_rejected, or neither")
    if all(has):
        rewards = [_number(row["score_chosen"], "score_chosen", k), _number(row["score_rejected"], "score_rejected", k)]
    else:
        rewards = list(cfg.reward_pair)
    return prompt, [chosen, rejected], rewards


def preference_examples(rows: Iterable[dict], tokenizer: Any, cfg: CoPGObjectiveConfig) -> PreferenceData:
    """Scored completions of every row (bundle id = row number), prompts limited as configured."""
    examples: list[ScoredCompletion] = []
    dropped = truncated = n = 0
    for k, row in enumerate(rows):
        n += 1
        if not isinstance(row, dict):
            raise ValueError(f"preference row {k}: expected an object, got {type(row).__name__}")
        prompt, texts, rewards = row_completions(row, k, cfg)
        p_ids = list(tokenizer.encode(prompt))
        if not p_ids:
            raise ValueError(f"preference row {k}: the prompt has no tokens")
        limit = cfg.max_prompt_tokens
        if limit and len(p_ids) > limit:
            if cfg.long_prompt == "drop":
                dropped += 1
                continue
            p_ids = p_ids[-limit:]
            truncated += 1
        for i, (text, r) in enumerate(zip(texts, rewards)):
            c_ids = list(tokenizer.encode(text))
            if not c_ids:
                raise ValueError(f"preference row {k}: completion {i} has no tokens")
            examples.append(ScoredCompletion(tuple(p_ids + c_ids), len(p_ids), r, k))
    if not examples:
        raise ValueError(f"no usable preference rows ({n} read, {dropped} dropped for a prompt over {cfg.max_prompt_tokens} tokens)")
    return PreferenceData(examples, n, dropped, truncated)


def bundle_batches(examples: Sequence[ScoredCompletion], bundles_per_batch: int) -> list[list[int]]:
    """Consecutive bundles, `bundles_per_batch` at a time, as lists of example indices."""
    order: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        order.setdefault(ex.bundle, []).append(i)
    groups = list(order.values())
    return [sorted(i for b in groups[j:j + bundles_per_batch] for i in b) for j in range(0, len(groups), bundles_per_batch)]


class PreferenceDataModule:
    """Global batches of whole bundles for CoPG: the slice of `DataModule`'s interface the
    training loop uses. Batches are `bundles_per_batch` bundles, reshuffled every epoch from
    (seed, epoch), so every rank builds the same batch of a step locally."""

    def __init__(self, data: PreferenceData, bundles_per_batch: int, seed: int, tokenizer: Any) -> None:
        self.examples = data.examples
        self.stats = {"rows": data.num_rows, "dropped_long_prompt": data.num_dropped_long_prompt,
                      "truncated_prompt": data.num_truncated_prompt}
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.seed = seed
        self.bundles_per_batch = bundles_per_batch
        self._bundles = bundle_batches(self.examples, 1)
        self.batches_per_epoch = max(1, -(-len(self._bundles) // bundles_per_batch))

    def all_batches(self) -> list[list[int]]:
        """Every example once, in batches of whole bundles (for the reference pass)."""
        return bundle_batches(self.examples, self.bundles_per_batch)

    def _indices(self, step: int) -> list[int]:
        import random

        epoch, k = divmod(step, self.batches_per_epoch)
        order = list(range(len(self._bundles)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        chosen = order[k * self.bundles_per_batch:(k + 1) * self.bundles_per_batch]
        return [i for b in chosen for i in self._bundles[b]]

    def train_batch(self, step: int) -> list[ScoredCompletion]:
        return [self.examples[i] for i in self._indices(step)]

    def train_batch_lengths(self, step: int) -> list[int]:
        return [len(self.examples[i]) for i in self._indices(step)]

    def train_batch_bundles(self, step: int) -> list[list[int]]:
        return bundle_batches(self.train_batch(step), 1)

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def val_batches(self, num: int) -> list:
        return []

