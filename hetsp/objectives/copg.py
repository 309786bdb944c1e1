"""CoPG, Contrastive Policy Gradient (REFERENCE.md section 3): the unit is a bundle.

A bundle is the k >= 2 scored completions of one prompt (a pair when k = 2).
With lr(y) = log pi(y|x) - log pi_ref(y|x) summed over completion tokens and
R the (scaled) reward, a pair's loss is

    ((R(y) - R(y')) - beta (lr(y) - lr(y')))^2 / (2 beta)

and a bundle's loss is the mean over its k (k - 1) / 2 pairs. The step loss
is the sum of bundle losses over the number of bundles of the global batch.

The only statistic per sequence is log pi(y|x), the sum of completion-token
log-probabilities, assembled by the executor across ranks and groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from hetsp.objectives.base import IGNORE_INDEX, Objective, label_log_probs
from hetsp.objectives.config import CoPGObjectiveConfig


@dataclass(frozen=True)
class ScoredCompletion:
    """One completion of a prompt: `tokens` = prompt then completion ids."""

    tokens: tuple[int, ...]
    prompt_len: int  # the first `prompt_len` tokens are the prompt (not scored)
    reward: float
    bundle: int  # the completions of one prompt share this id
    ref_logp: float | None = None  # log pi_ref(completion | prompt), summed over completion tokens

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.tokens) - self.prompt_len


def completion_labels(tokens: Sequence[int], prompt_len: int) -> list[int]:
    """Shifted targets of the completion tokens only: position t predicts token t+1 when t+1 is a
    completion token; every other position has no target."""
    return [tokens[t + 1] if t + 1 >= prompt_len else IGNORE_INDEX for t in range(len(tokens) - 1)] + [IGNORE_INDEX]


def copg_pair_loss(r: torch.Tensor, r2: torch.Tensor, lr: torch.Tensor, lr2: torch.Tensor, beta: float) -> torch.Tensor:
    """((r - r2) - beta (lr - lr2))^2 / (2 beta), elementwise."""
    return ((r - r2) - beta * (lr - lr2)) ** 2 / (2 * beta)


def bundle_pairs(bundle_ids: Sequence[int]) -> tuple[list[int], list[int], list[float]]:
    """Every pair (i, j), i < j, of positions sharing a bundle id, with weight 1 / (pairs in its
    bundle). Raises ValueError for a bundle of one."""
    groups: dict[int, list[int]] = {}
    for j, b in enumerate(bundle_ids):
        groups.setdefault(int(b), []).append(j)
    first, second, weight = [], [], []
    for b, members in groups.items():
        k = len(members)
        if k < 2:
            raise ValueError(f"bundle {b} has a single completion; CoPG needs at least two completions per prompt")
        w = 2.0 / (k * (k - 1))
        for x in range(k):
            for y in range(x + 1, k):
                first.append(members[x])
                second.append(members[y])
                weight.append(w)
    return first, second, weight


def copg_loss(rewards_S: torch.Tensor, logratio_S: torch.Tensor, bundle_ids: Sequence[int], beta: float) -> torch.Tensor:
    """Sum over bundles of the mean CoPG pair loss over every pair of the bundle. Shapes (S,)."""
    first, second, weight = bundle_pairs(bundle_ids)
    i = torch.tensor(first, dtype=torch.long, device=logratio_S.device)
    j = torch.tensor(second, dtype=torch.long, device=logratio_S.device)
    w = torch.tensor(weight, dtype=logratio_S.dtype, device=logratio_S.device)
    return (w * copg_pair_loss(rewards_S[i], rewards_S[j], logratio_S[i], logratio_S[j], beta)).sum()


class CoPG(Objective):
    name = "copg"
    unit = "bundle (a pair of completions when k = 2)"
    num_stats = 1

    def __init__(self, cfg: CoPGObjectiveConfig | None = None) -> None:
        super().__init__(cfg or CoPGObjectiveConfig())
        self.cfg.check()

    def tokens(self, example: ScoredCompletion) -> Sequence[int]:
        return example.tokens

    def token_inputs(self, example: ScoredCompletion) -> dict[str, list]:
        return {"labels": completion_labels(example.tokens, example.prompt_len)}

    def timing_objective(self) -> Objective:
        """Language modelling: the same forward and backward over every token as the completion
        log-probs (the pair statistics' one small all-reduce per micro-batch is not in the table)."""
        from hetsp.objectives.lm import LanguageModeling

        return LanguageModeling()

    def bundles(self, examples: Sequence[ScoredCompletion]) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for i, ex in enumerate(examples):
            if ex.num_completion_tokens < 1:
                raise ValueError(f"batch sequence {i} (bundle {ex.bundle}) has a completion with no tokens")
            groups.setdefault(ex.bundle, []).append(i)
        for b, members in groups.items():
            if len(members) < 2:
                raise ValueError(f"bundle {b} has a single completion (batch sequence {members[0]}); CoPG needs two or more")
        return list(groups.values())

    def num_units(self, examples: Sequence[ScoredCompletion]) -> int:
        return len(self.bundles(examples))

    def token_stats(self, logits_TV: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return label_log_probs(logits_TV, inputs["labels"])[:, None]

    def _terms(self, stats_SK: torch.Tensor, examples: Sequence[ScoredCompletion]):
        missing = [i for i, ex in enumerate(examples) if ex.ref_logp is None]
        if missing:
            raise ValueError(f"{len(missing)} completion(s) have no reference log-prob (bundle {examples[missing[0]].bundle})")
        ref = stats_SK.new_tensor([ex.ref_logp for ex in examples])
        logratio = stats_SK[:, 0] - ref
        if self.cfg.logprob == "mean":
            logratio = logratio / stats_SK.new_tensor([ex.num_completion_tokens for ex in examples])
        rewards = stats_SK.new_tensor([ex.reward for ex in examples]) * self.cfg.reward_scale
        return rewards, logratio, [ex.bundle for ex in examples]

    def loss_from_stats(self, stats_SK: torch.Tensor, examples: Sequence[ScoredCompletion]) -> torch.Tensor:
        rewards, logratio, bundles = self._terms(stats_SK, examples)
        return copg_loss(rewards, logratio, bundles, self.cfg.beta)

    def metrics_from_stats(self, stats_SK: torch.Tensor, examples: Sequence[ScoredCompletion]) -> dict[str, float]:
        """Sums over the micro-batch; `finish_metrics` turns the step's sums into means."""
        with torch.no_grad():
            rewards, logratio, bundles = self._terms(stats_SK, examples)
            out = {"bundles": 0.0, "reward_chosen": 0.0, "reward_rejected": 0.0, "margin": 0.0,
                   "pair_loss": float(copg_loss(rewards, logratio, bundles, self.cfg.beta)),
                   "kl": float((stats_SK[:, 0] - stats_SK.new_tensor([ex.ref_logp for ex in examples])).sum()),
                   "completions": float(len(examples)), "ordered": 0.0, "ordered_pairs": 0.0}
            groups: dict[int, list[int]] = {}
            for j, b in enumerate(bundles):
                groups.setdefault(b, []).append(j)
            for members in groups.values():
                best = max(members, key=lambda j: float(rewards[j]))
                worst = min(members, key=lambda j: float(rewards[j]))
                out["bundles"] += 1
                out["reward_chosen"] += float(rewards[best])
                out["reward_rejected"] += float(rewards[worst])
                out["margin"] += float(logratio[best] - logratio[worst])
                for a in range(len(members)):
                    for c in range(a + 1, len(members)):
                        dr = float(rewards[members[a]] - rewards[members[c]])
                        if dr != 0.0:
                            out["ordered_pairs"] += 1
                            out["ordered"] += float(math.copysign(1, dr) * float(logratio[members[a]] - logratio[members[c]]) > 0)
        return out

    def build_data(self, cfg: Any, seed: int) -> Any:
        """Offline pairs from `objective.data` (TRL formats), tokenized with `data.tokenizer`."""
        from hetsp.data.preference import PreferenceDataModule, preference_examples, read_rows
        from hetsp.data.tokenizer import load_tokenizer

        if self.cfg.eval_prompts:
            from hetsp.objectives.online import heldout_prompts

            self._heldout = heldout_prompts(cfg, self.cfg)
        if self.cfg.online_every:
            from hetsp.objectives.online import online_prompts

            return online_prompts(cfg, self.cfg, seed)
        if not self.cfg.data:
            raise ValueError("objective.data: give a preference file (.jsonl/.json/.parquet) for offline CoPG")
        tok = load_tokenizer(cfg.data.tokenizer)
        data = preference_examples(read_rows(self.cfg.data), tok, self.cfg)
        return PreferenceDataModule(data, self.cfg.bundles_per_batch, seed, tok)

    def prepare_run(self, ctx: Any) -> None:
        """Reference log-probs before the first step: precomputed under hetsp's plans (cached in
        the run folder), or, for `reference = "live"`, a frozen copy kept for every step."""
        from hetsp.objectives.reference import precompute_reference

        if self.cfg.reference == "live":
            from hetsp.objectives.zero3_reference import describe

            self._frozen = frozen_reference(ctx.engine)
            note = describe(self._frozen)
            if note:
                ctx.log(note)
            return
        examples, cached = precompute_reference(
            ctx.engine.module, ctx.data.examples, ctx.data.all_batches(),
            lambda batch: ctx.planning.plan_for(-1, sequences=batch, bundles=self.bundles(batch)),
            ctx.run_dir, ctx.rank, ctx.world_size, ctx.device, self, ctx.kernel,
        )
        ctx.data.examples = examples
        ctx.log(f"reference log-probs: {'read from the cache' if cached else 'computed'} for {len(examples)} completions")

    def heldout_metrics(self, ctx: Any) -> dict[str, float] | None:
        """With `eval_prompts`: mean reward of completions sampled on held-out prompts, and the KL
        estimate to the live reference (`hetsp.objectives.online.heldout_metrics`)."""
        if not self.cfg.eval_prompts:
            return None
        from hetsp.objectives.online import heldout_metrics

        return heldout_metrics(self, ctx, *self._heldout, getattr(self, "_frozen", None))

    def makes_batch(self, step: int) -> bool:
        return bool(self.cfg.online_every)

    def train_batch(self, ctx: Any, step: int) -> list | None:
        """Online CoPG: the completions step `step` trains on, sampled every `online_every` steps
        from the current policy (every rank takes part); offline: None (the data module's batch)."""
        n = self.cfg.online_every
        if not n:
            return None
        from hetsp.objectives.online import sample_round, step_examples

        rnd = step // n
        if getattr(self, "_round", None) != rnd:
            self._samples = sample_round(self, ctx, rnd)
            self._round = rnd
        return step_examples(self._samples, step, n, self.cfg.bundles_per_batch)

    def step_batch(self, ctx: Any, plan: Any, batch: list) -> list:
        """The batch with reference log-probs (live mode: from the frozen copy under `plan`)."""
        if self.cfg.reference != "live":
            return batch
        from hetsp.objectives.reference import live_reference

        return live_reference(self._frozen, plan, batch, ctx.rank, ctx.world_size, ctx.device, self, ctx.kernel)

    @staticmethod
    def finish_metrics(sums: dict[str, float]) -> dict[str, float]:
        """Per-step means: rewards of the best and worst completion of each bundle, the log-ratio
        margin between them, the pair loss, the mean log-ratio (an estimate of KL(pi || pi_ref) on
        samples of pi) and the fraction of differently rewarded pairs whose order the policy matches."""
        n = max(1.0, sums.get("bundles", 0.0))
        out = {
            "reward_chosen": sums.get("reward_chosen", 0.0) / n,
            "reward_rejected": sums.get("reward_rejected", 0.0) / n,
            "margin": sums.get("margin", 0.0) / n,
            "pair_loss": sums.get("pair_loss", 0.0) / n,
            "kl": sums.get("kl", 0.0) / max(1.0, sums.get("completions", 0.0)),
        }
        if sums.get("ordered_pairs"):
            out["order_acc"] = sums["ordered"] / sums["ordered_pairs"]
        return out


def frozen_reference(engine: Any) -> Any:
    """The frozen starting policy for live reference log-probs: the policy itself when it is a
    peft model (adapters disabled at use), else a frozen copy taken before any checkpoint is
    loaded (so a resumed run gets the same starting policy). Under ZeRO-3 the copy is partitioned
    like the policy and runs in its own DeepSpeed engine (`hetsp.objectives.zero3_reference`).
    The copy's sequence-parallel SSM kernels are bound to the copy's own layers
    (`hetsp.ssm_parallel.hybrid.GroupKernel`); the Mamba-2 hybrids of transformers read the shard
    from each call, so they need nothing."""
    import copy

    from hetsp.objectives.zero3_reference import is_partitioned, partitioned_copy

    module = engine.module
    if callable(getattr(module, "disable_adapter", None)):
        return module
    if is_partitioned(module):
        return partitioned_copy(engine)
    frozen = copy.deepcopy(module).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen
