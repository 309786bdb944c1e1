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
world_size / num_units before backward. Objectives with per-sequence
statistics (CoPG) assemble them with one all-reduce per micro-batch and
backpropagate detached coefficients times local partial statistics
(`micro_batch_loss`, `hetsp.objectives.base`). Objectives that need the next
position's output (SequenceMatch's V_{t+1}) get a `NextIndex` and exchange
it with one all-reduce per micro-batch.
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
from hetsp.plan import Group, Plan
from hetsp.ssm_parallel.detect import require_parallelized


@dataclass
class MicroBatchInputs:
    """What this rank feeds the model for one micro-batch."""

    input_ids: torch.Tensor  # (1, T) int64
    tokens: dict[str, torch.Tensor]  # the objective's per-token inputs, each (T,); "labels" among them
    seq_slot: torch.Tensor  # (T,) int64: index in the micro-batch's sequence list, -1 on filler tokens
    shard: Any  # hetsp.attention.ShardContext
    weight: float  # 1.0, or 0.0 for a placeholder on an idle rank
    group: Group | None
    # Objectives that need the next position's output (`objective.next_position_outputs`): `NextIndex`.
    exchange: Any = None
    seq_pos: torch.Tensor | None = None  # (T,) int64: position within its sequence, -1 on filler tokens

    @property
    def labels(self) -> torch.Tensor:
        return self.tokens["labels"]


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
    loss_sum: float  # this rank's sum of unit losses (sequence-level losses counted on rank 0 only)
    num_units: int  # units in the whole global batch
    num_local_tokens: int
    micro_batch_tokens: list[int] = field(default_factory=list)
    data_s: float = 0.0  # seconds building this rank's micro-batch inputs
    comm_s: float = 0.0  # seconds blocked in hetsp's exchanges (ring, SSM state, halos)
    # Objectives with per-sequence statistics: the assembled (K,) statistics of every batch
    # sequence (the same on every rank), and the sums of `metrics_from_stats`.
    seq_stats: dict[int, list[float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # per micro-batch on this rank: (start, end) in seconds from the start of `run_plan`, and the CPU
    # seconds its thread spent (what `bench/cost_model.py` compares with the cost model)
    micro_batch_s: list[tuple[float, float]] = field(default_factory=list)
    micro_batch_cpu_s: list[float] = field(default_factory=list)


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


def _fill_tensor(values: list, device: torch.device) -> torch.Tensor:
    """Per-token inputs as a tensor: integers as int64, anything else (nested lists too) as float64
    (the objective casts to the logits' dtype)."""
    t = torch.tensor(values)
    if t.is_floating_point():  # built again in float64: the default float32 would round the values
        t = torch.tensor(values, dtype=torch.float64)
    return t.to(device)


def micro_batch_inputs(
    plan: Plan,
    mb_index: int,
    sequences: Sequence[Any],
    rank: int,
    device: torch.device,
    objective: Any,
    kernel: str = "auto",
    placeholder_token: int = 0,
    structures: Sequence[StackStructure | None] | None = None,
) -> MicroBatchInputs:
    """Shard this rank's part of micro-batch `mb_index` (pure data movement, no model).

    Every per-token input of the objective is computed on the whole sequence,
    then cut by the same layout as the token ids.
    structures: per sequence of the batch, its `<bkspc>` stack structure (hetsp.backspace) or None;
    the group's structures travel in the shard context. None: plain sequences (today's path).
    """
    group = plan.micro_batches[mb_index].group_of(rank)
    fill = objective.token_fill
    if group is None or not group.seqs:
        shard = make_shard_context([1], rank, 1, rank, device, kernel=kernel)
        ids = torch.tensor([[placeholder_token]], dtype=torch.long, device=device)
        tokens = {k: _fill_tensor([v], device) for k, v in fill.items()}
        slot = torch.full((1,), -1, dtype=torch.long, device=device)
        exchange = _next_index(plan, mb_index, group, [], device) if objective.next_position_outputs else None
        return MicroBatchInputs(ids, tokens, slot, shard, 0.0, group, exchange, slot.clone())
    lengths = [plan.lengths[s] for s in group.seqs]
    slot_of = {s: j for j, s in enumerate(plan.micro_batches[mb_index].seqs())}
    packed_ids: list[int] = []
    packed: dict[str, list] = {k: [] for k in fill}
    packed_slot: list[int] = []
    packed_pos: list[int] = []
    for s, n in zip(group.seqs, lengths):
        ids_s = objective.tokens(sequences[s])
        if len(ids_s) != n:
            raise ValueError(f"plan says sequence {s} has {n} tokens but the batch has {len(ids_s)}")
        per_token = objective.token_inputs(sequences[s])
        for k in fill:
            packed[k] += per_token[k]
        packed_ids += ids_s
        packed_slot += [slot_of[s]] * n
        packed_pos += range(n)
    if _needs_filler(lengths, group.size):
        # Some rank would hold no token (sequences shorter than the group): append a filler
        # document of `size` tokens, which the zigzag split gives one token per rank. It is its
        # own document (no token attends across it, SSM state resets at it), has no targets and
        # adds to no sequence statistic.
        lengths = lengths + [group.size]
        packed_ids += [placeholder_token] * group.size
        for k, v in fill.items():
            packed[k] += [v] * group.size
        packed_slot += [-1] * group.size
        packed_pos += [-1] * group.size
    layout = shard_layout(lengths, group.size, rank - group.start)
    index = torch.tensor(layout.token_index, dtype=torch.long)
    ids = torch.tensor(packed_ids, dtype=torch.long)[index].to(device)[None]
    tokens = {k: _fill_tensor(v, torch.device("cpu"))[index].to(device) for k, v in packed.items()}
    slot = torch.tensor(packed_slot, dtype=torch.long)[index].to(device)
    pos = torch.tensor(packed_pos, dtype=torch.long)[index].to(device)
    structure = _group_structure(structures, group.seqs, lengths)
    shard = make_shard_context(lengths, group.start, group.size, rank, device, kernel=kernel, structure=structure)
    exchange = _next_index(plan, mb_index, group, layout.token_index, device) if objective.next_position_outputs else None
    return MicroBatchInputs(ids, tokens, slot, shard, 1.0, group, exchange, pos)


def forward_logits(model: Callable[..., Any], inputs: MicroBatchInputs) -> torch.Tensor:
    """The model's logits for this rank's tokens, (T, V)."""
    out = model(input_ids=inputs.input_ids, position_ids=inputs.shard.positions[None], hetsp_shard=inputs.shard)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0]


def forward_loss(model: Callable[..., Any], inputs: MicroBatchInputs, objective: Any) -> torch.Tensor:
    """This rank's sum of token-unit losses for one micro-batch (times its weight)."""
    return objective.token_loss(forward_logits(model, inputs), inputs.tokens) * inputs.weight


@dataclass
class MicroBatchLoss:
    """One micro-batch's terms on this rank."""

    local: torch.Tensor  # what this rank backpropagates: its exact share of the micro-batch loss
    reported: float  # this rank's share of the loss value (sequence-level part on rank 0 only)
    stats_SK: torch.Tensor | None = None  # assembled statistics (the same on every rank)


def assemble_stats(partial_SK: torch.Tensor) -> torch.Tensor:
    """Sum every rank's partial per-sequence statistics: ONE all-reduce over a fixed-size fp64
    vector (the micro-batch's sequence count times K, known to every rank from the plan)."""
    import torch.distributed as dist

    total = partial_SK.detach().to(torch.float64).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total


def micro_batch_loss(
    model: Callable[..., Any],
    inputs: MicroBatchInputs,
    objective: Any,
    examples: Sequence[Any],
    rank: int,
    stats_only: bool = False,
) -> MicroBatchLoss:
    """Forward one micro-batch and build this rank's loss terms.

    Sequence-level terms: the loss L(stats) is computed from the assembled
    statistics on every rank; each rank backpropagates sum(dL/dstats * its
    partial stats), whose sum over ranks has exactly the gradient of L.
    """
    logits = forward_logits(model, inputs)
    if objective.next_position_outputs:
        # the objective reads the next position's output through `inputs.exchange` (`NextIndex`):
        # one all-reduce per micro-batch over a vector of every token of the micro-batch, every rank taking part
        token = objective.token_loss_exchanged(logits, inputs)
    else:
        token = objective.token_loss(logits, inputs.tokens)
    local = token * inputs.weight if token is not None else logits.sum() * 0.0
    reported = float(local.detach())
    if not objective.num_stats or not examples:  # the plan tells every rank alike: no collective
        return MicroBatchLoss(local, reported)
    per_token_TK = objective.token_stats(logits, inputs.tokens)
    keep = inputs.seq_slot >= 0
    partial_SK = per_token_TK.new_zeros((len(examples), objective.num_stats))
    partial_SK = partial_SK.index_add(0, inputs.seq_slot[keep], per_token_TK[keep]) * inputs.weight
    stats_SK = assemble_stats(partial_SK)
    if stats_only:
        return MicroBatchLoss(local, 0.0, stats_SK)
    stats_SK.requires_grad_(True)
    with torch.enable_grad():
        seq_loss = objective.loss_from_stats(stats_SK, examples)
        (coef_SK,) = torch.autograd.grad(seq_loss, stats_SK)
    local = local + (coef_SK.to(partial_SK.dtype) * partial_SK).sum()
    if rank == 0:
        reported += float(seq_loss.detach())
    return MicroBatchLoss(local, reported, stats_SK.detach())


def run_plan(
    engine: Any,
    plan: Plan,
    sequences: Sequence[Any],
    rank: int,
    world_size: int,
    device: torch.device,
    objective: Any,
    kernel: str = "auto",
    train: bool = True,
    structures: Sequence[StackStructure | None] | None = None,
    stats_only: bool = False,
    read_logits: Callable[[int, MicroBatchInputs, torch.Tensor], None] | None = None,
) -> StepResult:
    """Forward (and backward when `train`) of every micro-batch of `plan` on this rank.

    `stats_only` (no backward): only assemble the objective's per-sequence statistics
    (`StepResult.seq_stats`), e.g. the reference model's log-probs; no loss is computed.

    `engine` is a DeepSpeed engine when training (its `backward` and
    `set_gradient_accumulation_boundary` are used; the caller calls
    `engine.step()` afterwards), or any callable model for evaluation.
    `structures`: per sequence, its `<bkspc>` stack structure or None (`micro_batch_inputs`).
    `read_logits(m, inputs, logits)`: a read-only pass (no loss, no backward, no gradient): each
    micro-batch's logits on this rank go to it (placeholders of idle ranks included, weight 0).
    A model with recurrent or causal-convolution layers must have been through
    `hetsp.ssm_parallel.parallelize` (refused otherwise).
    """
    require_parallelized(getattr(engine, "module", engine))
    train = train and not stats_only and read_logits is None
    num_units = objective.num_units(sequences)
    if num_units == 0:
        raise ValueError(f"the global batch has no {objective.unit} to train on "
                         "(single-token sequences, or no trainable token)")
    plan.check_bundle_placement(objective.bundles(sequences))
    scale = world_size / num_units
    total = 0.0
    local_tokens = 0
    per_mb = []
    seq_stats: dict[int, list[float]] = {}
    metrics: dict[str, float] = {}
    num_mb = plan.num_micro_batches
    data_s = 0.0
    comm_start = COMM_WAIT.total()
    start = time.perf_counter()
    spans: list[tuple[float, float]] = []
    cpu: list[float] = []
    for m in range(num_mb):
        t0 = time.perf_counter()
        c0 = time.thread_time()
        inputs = micro_batch_inputs(plan, m, sequences, rank, device, objective, kernel, structures=structures)
        data_s += time.perf_counter() - t0
        n_tok = inputs.input_ids.shape[1] if inputs.weight else 0
        local_tokens += n_tok
        per_mb.append(n_tok)
        mb_seqs = plan.micro_batches[m].seqs()
        examples = [sequences[s] for s in mb_seqs]
        if read_logits is not None:
            with torch.no_grad():
                read_logits(m, inputs, forward_logits(engine, inputs))
            spans.append((t0 - start, time.perf_counter() - start))
            cpu.append(time.thread_time() - c0)
            continue
        if train:
            engine.set_gradient_accumulation_boundary(m == num_mb - 1)
            res = micro_batch_loss(engine, inputs, objective, examples, rank)
            engine.backward(res.local * scale, scale_wrt_gas=False)
        else:
            with torch.no_grad():
                res = micro_batch_loss(engine, inputs, objective, examples, rank, stats_only)
        total += res.reported
        spans.append((t0 - start, time.perf_counter() - start))
        cpu.append(time.thread_time() - c0)
        if res.stats_SK is not None:
            for j, s in enumerate(mb_seqs):
                seq_stats[s] = res.stats_SK[j].tolist()
        if res.stats_SK is not None and not stats_only:
            for k, v in objective.metrics_from_stats(res.stats_SK, examples).items():
                metrics[k] = metrics.get(k, 0.0) + v
    return StepResult(total, num_units, local_tokens, per_mb, data_s, COMM_WAIT.total() - comm_start, seq_stats, metrics,
                      micro_batch_s=spans, micro_batch_cpu_s=cpu)
