"""Typed `[objective]` sections, one dataclass per objective (no torch: `hetsp.config` reads them).

The section applies to the objective named by `train.objective`; its keys are
checked like every other section (unknown keys are errors naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass
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

    def check(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"objective.beta must be > 0, got {self.beta}")
        if not self.reward_scale > 0:
            raise ValueError(f"objective.reward_scale must be > 0, got {self.reward_scale}")


OBJECTIVE_CONFIGS: dict[str, type] = {"lm": LMObjectiveConfig, "copg": CoPGObjectiveConfig}
