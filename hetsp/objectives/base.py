"""The one interface of every training objective (language modelling, CoPG, SequenceMatch).

Legend: T = tokens this rank holds in a micro-batch, V = vocabulary,
S = sequences of a micro-batch, K = statistics per sequence.

An objective sees a micro-batch as whole sequences ("examples"), not only as
one rank's tokens. Its pieces, in the order the executor uses them:

1. `tokens(example)` and `token_inputs(example)`: the token ids and every
   per-token input (labels, masks...), computed on the WHOLE sequence before
   the layout cuts it, so a shard boundary never loses a target. Quantities
   that depend on the next position's data belong here, shifted like the labels.
2. `token_loss(logits_TV, inputs)`: this rank's sum of token-unit losses
   (None when the objective has no token-level term).
3. Per-sequence statistics (`num_stats` = K > 0): `token_stats(logits_TV,
   inputs)` gives each token's (T, K) contribution; a sequence's statistic is
   the sum over its tokens on every rank of its group. The executor sums
   them into one fixed-size (S, K) vector per micro-batch with ONE world
   all-reduce (every rank takes part, idle ones with zeros), then
   `loss_from_stats(stats_SK, examples)` gives the micro-batch's sum of unit
   losses (its bundles are whole: the planner keeps a bundle in one
   micro-batch). The gradient is exact: each rank backpropagates
   sum(detached d loss / d stats * its local partial stats).
4. `next_position_outputs`: names of model outputs a token needs from the
   NEXT position (SequenceMatch's value V_{t+1}), which may sit on another
   rank. The executor gives such an objective a `NextIndex` (one all-reduce per
   micro-batch) and calls `token_loss_exchanged(logits_TV, inputs)` instead.

The step loss is the sum of unit losses over the global batch divided by
`num_units(examples)`, whatever the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

IGNORE_INDEX = -100


@dataclass
class RunContext:
    """What an objective's run hooks may use (built by the training loop on every rank)."""

    engine: Any
    data: Any
    planning: Any
    run_dir: Any
    rank: int
    world_size: int
    device: Any
    kernel: str
    log: Callable[[str], None]


class Objective:
    name = "base"
    unit = "token"  # what one unit of the step loss is
    num_stats = 0  # K
    next_position_outputs: tuple[str, ...] = ()
    # Value of each per-token input on filler and placeholder tokens (no target, no statistic).
    token_fill: dict[str, float | int] = {"labels": IGNORE_INDEX}

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg

    # ---- the run ------------------------------------------------------------------
    def build_data(self, cfg: Any, seed: int) -> Any:
        """The data module this objective trains on (default: the tokenized corpus)."""
        from hetsp.data import build_data

        return build_data(cfg.data, seed)

    def prepare_run(self, ctx: Any) -> None:
        """Called once on every rank before any checkpoint is loaded, so the model is the starting
        policy (e.g. reference log-probs)."""

    def train_batch(self, ctx: Any, step: int) -> list | None:
        """The batch of step `step` when the objective makes it (online sampling); None: the data
        module's `train_batch(step)`, planned ahead."""
        return None

    def timing_objective(self) -> "Objective":
        """The objective the profiler times plain token sequences with (`hetsp.profiler.measure`): this
        one, unless its examples are more than token lists."""
        return self

    def makes_batch(self, step: int) -> bool:
        """Whether `train_batch(ctx, step)` makes step `step`'s batch (then the loop plans it at the
        step instead of ahead)."""
        return False

    def step_batch(self, ctx: Any, plan: Any, batch: list) -> list:
        """The batch as `run_plan` gets it (e.g. with live reference log-probs)."""
        return batch

    def set_step(self, step: int) -> None:
        """The training step about to run (objectives with a schedule over steps use it)."""

    def structures(self, batch: Sequence[Any]) -> list | None:
        """Per sequence of `batch`, its `<bkspc>` stack structure (hetsp.backspace) or None; None:
        plain sequences. Passed to `run_plan(..., structures=...)`."""
        return None

    @staticmethod
    def finish_metrics(sums: dict[str, float]) -> dict[str, float]:
        """Per-step metrics from the step's sums of `metrics_from_stats`."""
        return {}

    def heldout_metrics(self, ctx: Any) -> dict[str, float] | None:
        """Metrics on held-out data of the current policy, measured before the first update and
        after the last (every rank takes part); None: the objective has none."""
        return None

    # ---- data, before the layout ---------------------------------------------
    def tokens(self, example: Any) -> Sequence[int]:
        return example

    def token_inputs(self, example: Any) -> dict[str, list]:
        raise NotImplementedError

    def bundles(self, examples: Sequence[Any]) -> list[list[int]]:
        """Sets of batch indices that must share a micro-batch (default: bundles of one)."""
        return [[i] for i in range(len(examples))]

    def num_units(self, examples: Sequence[Any]) -> int:
        raise NotImplementedError

    # ---- model outputs -----------------------------------------------------------
    def token_loss(self, logits_TV: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def token_stats(self, logits_TV: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss_from_stats(self, stats_SK: torch.Tensor, examples: Sequence[Any]) -> torch.Tensor:
        raise NotImplementedError

    def metrics_from_stats(self, stats_SK: torch.Tensor, examples: Sequence[Any]) -> dict[str, float]:
        """Sums over the micro-batch (the executor adds them up over micro-batches)."""
        return {}


def label_log_probs(logits_TV: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    """log p(label) per token in at least fp32, 0 where the label is IGNORE_INDEX. Shape (T,)."""
    logits_TV = logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32))
    valid = labels_T != IGNORE_INDEX
    logp = torch.log_softmax(logits_TV, dim=-1)
    picked = logp.gather(-1, torch.where(valid, labels_T, 0)[:, None])[:, 0]
    return torch.where(valid, picked, torch.zeros_like(picked))
