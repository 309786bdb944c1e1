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
    # Offline preference file (.jsonl/.json/.parquet) in TRL's formats; online: rows with a
    # 'prompt' field, or "" for the prompts of the [data] fine-tuning dataset.
    data: str = ""
    bundles_per_batch: int = 8  # prompts (bundles) per global batch
    # Offline pairs without score_chosen/score_rejected get these rewards. With the default
    # (+1/4, -1/4), CoPG's gradient is IPO's (tau = beta) divided by 2 beta (REFERENCE.md section 3).
    reward_pair: list[float] = field(default_factory=lambda: [0.25, -0.25])
    # A prompt longer than this many tokens (0: no limit) is dropped with a count ("drop") or
    # keeps its last max_prompt_tokens tokens ("truncate_left").
    max_prompt_tokens: int = 0
    long_prompt: Literal["drop", "truncate_left"] = "drop"
    # Online CoPG (hetsp.objectives.online): every `online_every` steps (0: offline data), sample
    # `samples_per_prompt` completions of each prompt of `data` from the current policy and score
    # them with `reward_fn` ("module:function", called as fn(prompt, completion)).
    online_every: int = 0
    samples_per_prompt: int = 2
    reward_fn: str = ""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    # How the k completions of an online round are drawn: "sample" (temperature, top_p) or
    # "diverse_beam" (Diverse Beam Search, REFERENCE.md section 6: k groups of one beam, Hamming
    # diversity `diversity`; each group's best beam is one completion; deterministic). Held-out
    # evaluation always samples (it measures the reward of sampled completions).
    decoding: Literal["sample", "diverse_beam"] = "sample"
    diversity: float = 0.5
    # Held-out evaluation (0: none): before the first update and after the last, sample
    # `samples_per_prompt` completions of each of the first `eval_prompts` validation prompts of
    # the [data] fine-tuning dataset (same sampling options, same random stream each time), and
    # log their mean `reward_fn` reward and, with a live reference, the KL estimate to it.
    eval_prompts: int = 0

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
        if self.eval_prompts < 0:
            raise ValueError(f"objective.eval_prompts must be >= 0 (0: no held-out evaluation), got {self.eval_prompts}")
        if self.eval_prompts and (not self.reward_fn or self.samples_per_prompt < 2):
            raise ValueError("objective.eval_prompts > 0 scores sampled completions: name objective.reward_fn "
                             "(module:function) and set samples_per_prompt >= 2")
        if self.online_every < 0:
            raise ValueError(f"objective.online_every must be >= 0 (0: offline), got {self.online_every}")
        if self.online_every:
            if not self.reward_fn:
                raise ValueError("objective.online_every > 0 samples completions: name objective.reward_fn (module:function)")
            if self.reference != "live":
                raise ValueError("online CoPG needs objective.reference = 'live' (precomputed log-probs cannot cover "
                                 "completions sampled during training)")
            if self.samples_per_prompt < 2:
                raise ValueError(f"objective.samples_per_prompt must be >= 2, got {self.samples_per_prompt}")
        if not self.diversity >= 0:
            raise ValueError(f"objective.diversity must be >= 0, got {self.diversity}")
        if self.decoding == "diverse_beam":
            if not self.online_every:
                raise ValueError("objective.decoding = 'diverse_beam' draws the completions of online rounds: set "
                                 "online_every > 0, or remove decoding")
            if not self.eval_prompts and (self.temperature != 1.0 or self.top_p != 1.0):
                raise ValueError("objective.temperature / top_p apply to sampling, and Diverse Beam Search is "
                                 "deterministic: remove them, use decoding = 'sample', or set eval_prompts (held-out "
                                 "evaluation samples with them)")
        elif self.diversity != 0.5:
            raise ValueError("objective.diversity applies to decoding = 'diverse_beam' only: remove it or set decoding")
        if self.online_every or self.eval_prompts:
            if self.max_new_tokens < 1 or not self.temperature > 0 or not 0 < self.top_p <= 1:
                raise ValueError("objective: max_new_tokens >= 1, temperature > 0 and top_p in (0, 1] for online sampling")


@dataclass(frozen=True)
class SequenceMatchConfig:
    """The typed [objective] section of `train.objective = "sequencematch"` (REFERENCE.md section 4;
    hetsp/objectives/sequencematch.py). Values are checked when the section is built."""

    gamma: float = 0.998  # discount, in (0, 1]
    chi2: float = 0.5  # c, the coefficient of r^2 (0: no chi^2 term)
    w_data: float = 1.0  # weight of the value term on data; 1/2 for the chi^2-mixture
    alpha: float = 0.01  # SequenceMatch weight after behaviour cloning: (1 - alpha) ML + alpha SM
    bc_steps: int = 0  # K: behaviour cloning (maximum likelihood) for the first K steps
    noise_p: float = 0.0  # probability of an injected (wrong token, <bkspc>) before each target
    noise_source: Literal["uniform", "model"] = "uniform"
    # Model-generated trajectories (the mixture's other half, hetsp.objectives.sm_sampling): every
    # `sample_every` steps once behaviour cloning is over (0: never), `samples_per_round` trajectories
    # sampled from the current policy with <bkspc> enabled, each continuing the first
    # `sample_prompt_tokens` tokens of a training sequence of the step for `sample_max_new_tokens`
    # actions at `sample_temperature`; they join that step's batch.
    sample_every: int = 0
    samples_per_round: int = 8
    sample_prompt_tokens: int = 32
    sample_max_new_tokens: int = 32
    sample_temperature: float = 1.0

    def __post_init__(self) -> None:
        self.check()

    def check_for_training(self) -> None:
        """What the training loop refuses on top of `check` (the loss itself, used on given
        trajectories, takes these): settings it would accept and not use."""
        if self.noise_source == "model" and self.noise_p == 0.0:
            raise ValueError("objective.noise_source = 'model' draws the injected wrong tokens, but noise_p = 0 injects "
                             "none; set noise_p > 0, or remove noise_source")
        if self.w_data < 1 and not self.sample_every:
            raise ValueError(f"objective.w_data = {self.w_data} puts {1 - self.w_data:g} of the value term on model-generated "
                             "trajectories, but objective.sample_every = 0 samples none; set sample_every > 0, or w_data = 1")
        if self.sample_every and (self.alpha == 0.0 or (self.chi2 == 0.0 and self.w_data == 1.0)):
            raise ValueError("objective.sample_every > 0 samples trajectories that would carry no weight (they enter only "
                             "the SequenceMatch term's chi^2 part and 1 - w_data of its value term; here alpha = "
                             f"{self.alpha}, chi2 = {self.chi2}, w_data = {self.w_data}); set sample_every = 0")

    def check(self) -> None:
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"objective.gamma = {self.gamma}: the discount must lie in (0, 1]")
        if self.chi2 < 0:
            raise ValueError(f"objective.chi2 = {self.chi2}: the chi^2 coefficient must be >= 0")
        if not 0.0 <= self.w_data <= 1.0:
            raise ValueError(f"objective.w_data = {self.w_data}: must lie in [0, 1] (1: value term on data only)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"objective.alpha = {self.alpha}: the mixing weight must lie in [0, 1]")
        if self.bc_steps < 0:
            raise ValueError(f"objective.bc_steps = {self.bc_steps}: must be >= 0")
        if not 0.0 <= self.noise_p < 1.0:
            raise ValueError(f"objective.noise_p = {self.noise_p}: the noise probability must lie in [0, 1)")
        if self.noise_source not in ("uniform", "model"):
            raise ValueError(f"objective.noise_source = {self.noise_source!r}: 'uniform' or 'model'")
        if self.sample_every < 0:
            raise ValueError(f"objective.sample_every = {self.sample_every}: must be >= 0 (0: no model-generated trajectories)")
        if self.sample_every:
            if self.samples_per_round < 1 or self.sample_prompt_tokens < 1 or self.sample_max_new_tokens < 1:
                raise ValueError("objective: samples_per_round, sample_prompt_tokens and sample_max_new_tokens must be >= 1 "
                                 "when sample_every > 0")
            if not self.sample_temperature > 0:
                raise ValueError(f"objective.sample_temperature = {self.sample_temperature}: must be > 0")

    @classmethod
    def from_dict(cls, d: dict | None) -> "SequenceMatchConfig":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"[objective] for sequencematch: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


OBJECTIVE_CONFIGS: dict[str, type] = {"lm": LMObjectiveConfig, "copg": CoPGObjectiveConfig,
                                      "sequencematch": SequenceMatchConfig}
