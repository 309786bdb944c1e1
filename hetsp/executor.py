"""Runs one `Plan` on this rank: shard, forward, loss, backward, per micro-batch.

Legend: T = tokens held by this rank in a micro-batch, V = vocabulary.

Every rank runs every micro-batch of the plan. A rank that the plan leaves
idle in a micro-batch (in no group, or in a group without sequences) runs
the model on one placeholder token as a group of one, with weight zero: it
still takes part in every collective the model makes (ZeRO-3 parameter
gathers, gradient reduce-scatters), adds exactly zero to every gradient,
and no kernel ever sees an empty tensor. So no plan can deadlock the job.

The step loss is the sum of unit losses (target tokens for language
modelling) over the whole global batch divided by the number of units in
the global batch, whatever the plan. DeepSpeed averages gradients over the
data-parallel world, so each micro-batch's local loss sum is scaled by
world_size / num_units before backward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from hetsp.attention import make_shard_context
from hetsp.backspace import StackStructure, is_plain, pack_structures, plain_structure
from hetsp.layout import shard_layout, zigzag_chunk_bounds
from hetsp.metrics.timing import COMM_WAIT
from hetsp.objectives.lm import IGNORE_INDEX
from hetsp.plan import Group, Plan
from hetsp.ssm_parallel.detect import require_parallelized


@dataclass
class MicroBatchInputs:
    """What this rank feeds the model for one micro-batch."""

    input_ids: torch.Tensor  # (1, T) int64
    labels: torch.Tensor  # (T,) int64, IGNORE_INDEX where there is no target
    shard: Any  # hetsp.attention.ShardContext
    weight: float  # 1.0, or 0.0 for a placeholder on an idle rank
    group: Group | None
    # Objectives with per-token inputs besides labels (`objective.token_inputs`): each a (T, ...) tensor.
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    # Objectives that need the next position's output (`objective.loss_sum_tokens`): `NextIndex`.
    exchange: Any = None


@dataclass
class NextIndex:
    """Where this rank's tokens sit in one vector over every token of the micro-batch (its groups'
    packed sequences, filler included, in group order): `size` entries, the same on every rank.
    own_local / own_index: this rank's real tokens and their entries; next_index: per local token,
    the entry of the next position of the packed sequence (any entry where there is none)."""

    size: int
    own_local: torch.Tensor
    own_index: torch.Tensor
    next_index: torch.Tensor


@dataclass
class StepResult:
    loss_sum: float  # this rank's sum of unit losses
    num_units: int  # units in the whole global batch
    num_local_tokens: int
    micro_batch_tokens: list[int] = field(default_factory=list)
    data_s: float = 0.0  # seconds building this rank's micro-batch inputs
    comm_s: float = 0.0  # seconds blocked in hetsp's exchanges (ring, SSM state, halos)


class PlainEngine:
    """The slice of DeepSpeed's engine API `run_plan` uses, on a plain module (no optimizer):
    gradients accumulate in `.grad` and stay local (no data-parallel reduction)."""

    def __init__(self, model: Any):
        self.module = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        pass

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        loss.backward()


def tokens_per_rank(lengths: Sequence[int], group_size: int) -> list[int]:
    """How many tokens each rank of a group holds under the zigzag layout."""
    counts = [0] * group_size
    for n in lengths:
        bounds = zigzag_chunk_bounds(n, group_size)
        for r in range(group_size):
            for c in (r, 2 * group_size - 1 - r):
                counts[r] += bounds[c][1] - bounds[c][0]
    return counts


def _group_structure(structures, seqs, lengths) -> StackStructure | None:
    """The packed stack structure of a group's sequences (filler included), or None when none has a `<bkspc>`."""
    if structures is None or all(structures[s] is None or is_plain(structures[s]) for s in seqs):
        return None
    parts = []
    for i, n in enumerate(lengths):
        s = structures[seqs[i]] if i < len(seqs) else None
        if s is not None and len(s) != n:
            raise ValueError(f"the stack structure of sequence {seqs[i]} covers {len(s)} tokens, the sequence has {n}")
        parts.append(plain_structure(n) if s is None else s)
    return pack_structures(parts)


def _needs_filler(lengths: Sequence[int], size: int) -> bool:
    return min(tokens_per_rank(lengths, size)) == 0


def _group_token_count(plan: Plan, group: Group) -> int:
    lengths = [plan.lengths[s] for s in group.seqs]
    return sum(lengths) + (group.size if group.seqs and _needs_filler(lengths, group.size) else 0)


def _next_index(plan: Plan, mb_index: int, group: Group | None, token_index: list[int], device: torch.device) -> NextIndex:
    groups = plan.micro_batches[mb_index].groups
    size = max(1, sum(_group_token_count(plan, g) for g in groups))  # >= 1: a placeholder reads entry 0
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if group is None or not group.seqs:
        return NextIndex(size, empty, empty, torch.zeros(1, dtype=torch.long, device=device))
    offset = 0
    for g in groups:
        if g is group or g == group:
            break
        offset += _group_token_count(plan, g)
    total = _group_token_count(plan, group)
    idx = torch.tensor(token_index, dtype=torch.long)
    return NextIndex(size, torch.arange(len(token_index), device=device), (idx + offset).to(device),
                     ((idx + 1).clamp(max=total - 1) + offset).to(device))


def micro_batch_inputs(
    plan: Plan,
    mb_index: int,
    sequences: Sequence[Sequence[int]],
    rank: int,
    device: torch.device,
    objective: Any,
    kernel: str = "auto",
    placeholder_token: int = 0,
    structures: Sequence[StackStructure | None] | None = None,
) -> MicroBatchInputs:
    """Shard this rank's part of micro-batch `mb_index` (pure data movement, no model).

    structures: per sequence of the batch, its `<bkspc>` stack structure (hetsp.backspace) or None;
    the group's structures travel in the shard context. None: plain sequences (today's path)."""
    group = plan.micro_batches[mb_index].group_of(rank)
    if group is None or not group.seqs:
        shard = make_shard_context([1], rank, 1, rank, device, kernel=kernel)
        ids = torch.tensor([[placeholder_token]], dtype=torch.long, device=device)
        labels = torch.full((1,), IGNORE_INDEX, dtype=torch.long, device=device)
        tokens = {k: _as_tensor([v]).to(device) for k, v in _token_fill(objective).items()}
        exchange = _next_index(plan, mb_index, group, [], device) if hasattr(objective, "loss_sum_tokens") else None
        return MicroBatchInputs(ids, labels, shard, 0.0, group, tokens, exchange)
    lengths = [plan.lengths[s] for s in group.seqs]
    for s, n in zip(group.seqs, lengths):
        if len(sequences[s]) != n:
            raise ValueError(f"plan says sequence {s} has {n} tokens but the batch has {len(sequences[s])}")
    packed_ids = [t for s in group.seqs for t in sequences[s]]
    packed_labels = [t for s in group.seqs for t in objective.labels(sequences[s])]
    extra = _packed_token_inputs(objective, [sequences[s] for s in group.seqs])
    if _needs_filler(lengths, group.size):
        # Some rank would hold no token (sequences shorter than the group): append a filler
        # document of `size` tokens, which the zigzag split gives one token per rank. It is its
        # own document (no token attends across it, SSM state resets at it) and has no targets.
        lengths = lengths + [group.size]
        packed_ids += [placeholder_token] * group.size
        packed_labels += [IGNORE_INDEX] * group.size
        for k, v in _token_fill(objective).items():
            extra[k] += [v] * group.size
    layout = shard_layout(lengths, group.size, rank - group.start)
    index = torch.tensor(layout.token_index, dtype=torch.long)
    ids = torch.tensor(packed_ids, dtype=torch.long)[index].to(device)[None]
    labels = torch.tensor(packed_labels, dtype=torch.long)[index].to(device)
    structure = _group_structure(structures, group.seqs, lengths)
    shard = make_shard_context(lengths, group.start, group.size, rank, device, kernel=kernel, structure=structure)
    tokens = {k: _as_tensor(v)[index].to(device) for k, v in extra.items()}
    exchange = _next_index(plan, mb_index, group, layout.token_index, device) if hasattr(objective, "loss_sum_tokens") else None
    return MicroBatchInputs(ids, labels, shard, 1.0, group, tokens, exchange)


def _as_tensor(values: list) -> torch.Tensor:
    """Integers as int64, anything else as float64 (the objective casts to the logits' dtype)."""
    t = torch.tensor(values)
    return torch.tensor(values, dtype=torch.float64) if t.is_floating_point() else t


def _token_fill(objective: Any) -> dict[str, Any]:
    fill = getattr(objective, "token_fill", None)
    return {k: v for k, v in fill().items() if k != "labels"} if fill else {}


def _packed_token_inputs(objective: Any, seqs: Sequence[Sequence[int]]) -> dict[str, list]:
    """The objective's per-token inputs besides labels, each computed on a whole sequence, then packed."""
    if not hasattr(objective, "token_inputs"):
        return {}
    out: dict[str, list] = {}
    for seq in seqs:
        for k, v in objective.token_inputs(seq).items():
            if k != "labels":
                out.setdefault(k, []).extend(v)
    return out


def forward_loss(model: Callable[..., Any], inputs: MicroBatchInputs, objective: Any) -> torch.Tensor:
    """This rank's sum of unit losses for one micro-batch (times its weight)."""
    out = model(input_ids=inputs.input_ids, position_ids=inputs.shard.positions[None], hetsp_shard=inputs.shard)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if hasattr(objective, "loss_sum_tokens"):  # needs per-token inputs and the next position's output
        return objective.loss_sum_tokens(logits[0], inputs) * inputs.weight
    return objective.loss_sum(logits[0], inputs.labels) * inputs.weight


def run_plan(
    engine: Any,
    plan: Plan,
    sequences: Sequence[Sequence[int]],
    rank: int,
    world_size: int,
    device: torch.device,
    objective: Any,
    kernel: str = "auto",
    train: bool = True,
    structures: Sequence[StackStructure | None] | None = None,
) -> StepResult:
    """Forward (and backward when `train`) of every micro-batch of `plan` on this rank.

    `engine` is a DeepSpeed engine when training (its `backward` and
    `set_gradient_accumulation_boundary` are used; the caller calls
    `engine.step()` afterwards), or any callable model for evaluation.
    `structures`: per sequence, its `<bkspc>` stack structure or None (`micro_batch_inputs`).
    A model with recurrent or causal-convolution layers must have been through
    `hetsp.ssm_parallel.parallelize` (refused otherwise).
    """
    require_parallelized(getattr(engine, "module", engine))
    num_units = objective.num_units(plan.lengths, sequences)
    if num_units == 0:
        raise ValueError("the global batch has no target tokens (single-token sequences, or no trainable token)")
    scale = world_size / num_units
    total = 0.0
    local_tokens = 0
    per_mb = []
    num_mb = plan.num_micro_batches
    data_s = 0.0
    comm_start = COMM_WAIT.total()
    for m in range(num_mb):
        t0 = time.perf_counter()
        inputs = micro_batch_inputs(plan, m, sequences, rank, device, objective, kernel, structures=structures)
        data_s += time.perf_counter() - t0
        n_tok = inputs.input_ids.shape[1] if inputs.weight else 0
        local_tokens += n_tok
        per_mb.append(n_tok)
        if train:
            engine.set_gradient_accumulation_boundary(m == num_mb - 1)
            loss_sum = forward_loss(engine, inputs, objective)
            engine.backward(loss_sum * scale, scale_wrt_gas=False)
        else:
            with torch.no_grad():
                loss_sum = forward_loss(engine, inputs, objective)
        total += float(loss_sum.detach())
    return StepResult(total, num_units, local_tokens, per_mb, data_s, COMM_WAIT.total() - comm_start)
