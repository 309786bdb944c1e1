"""Typed `[objective]` sections, one dataclass per objective (no torch: `hetsp.config` reads them).

The section applies to the objective named by `train.objective`; its keys are
checked like every other section (unknown keys are errors naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class LMObjectiveConfig:
    """Next-token language modelling has no options."""


@dataclass
class CoPGObjectiveConfig:
    """CoPG (REFERENCE.md section 3).

    `logprob = "sum"` (default) sums completion-token log-probabilities: that is
    the log-probability of the whole completion, for which the optimum of the
    loss is pi* proportional to pi_ref exp(R / beta). `"mean"` divides each
    completion's log-ratio by its token count (a length-normalised variant
    with a different optimum).
    """

    beta: float = 0.1
    logprob: Literal["sum", "mean"] = "sum"
    reward_scale: float = 1.0
    # Where the reference log-probs come from: "precomputed" (one pass before training,
    # cached in the run folder) or "live" (a frozen copy, or the base with LoRA adapters off).
    reference: Literal["precomputed", "live"] = "precomputed"
    data: str = ""  # offline preference file (.jsonl/.json/.parquet) in TRL's formats
    bundles_per_batch: int = 8  # prompts (bundles) per global batch
    # Offline pairs without score_chosen/score_rejected get these rewards. With the default
    # (+1/4, -1/4), CoPG's gradient is IPO's (tau = beta) divided by 2 beta (REFERENCE.md section 3).
    reward_pair: list[float] = field(default_factory=lambda: [0.25, -0.25])
    # A prompt longer than this many tokens (0: no limit) is dropped with a count ("drop") or
    # keeps its last max_prompt_tokens tokens ("truncate_left").
    max_prompt_tokens: int = 0
    long_prompt: Literal["drop", "truncate_left"] = "drop"

    def check(self) -> None:
        if len(self.reward_pair) != 2 or not self.reward_pair[0] > self.reward_pair[1]:
            raise ValueError(f"objective.reward_pair must be [chosen, rejected] with chosen > rejected, got {self.reward_pair}")
        if self.bundles_per_batch < 1:
            raise ValueError(f"objective.bundles_per_batch must be >= 1, got {self.bundles_per_batch}")
        if self.max_prompt_tokens < 0:
            raise ValueError(f"objective.max_prompt_tokens must be >= 0, got {self.max_prompt_tokens}")
        if not self.beta > 0:
            raise ValueError(f"objective.beta must be > 0, got {self.beta}")
        if not self.reward_scale > 0:
            raise ValueError(f"objective.reward_scale must be > 0, got {self.reward_scale}")


OBJECTIVE_CONFIGS: dict[str, type] = {"lm": LMObjectiveConfig, "copg": CoPGObjectiveConfig}
