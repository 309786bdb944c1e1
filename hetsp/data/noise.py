"""Noise injection for SequenceMatch (REFERENCE.md section 4): before a target token, with
probability p, insert a wrong token followed by `<bkspc>`. The wrong token's action is masked
out of the loss (`Trajectory.noise`); the `<bkspc>` and everything after it are trained.

The wrong token is drawn uniformly from the real tokens other than the target, or from the
model: `proposals[j]` are the model's logits before clean token j (its output at clean
position j - 1, one forward on the clean sequence), with the target and `<bkspc>` excluded.

In the training loop (noise_source = "model"), where noise goes does not depend on the model:
`NoisyData` draws the insertions and each one's uniform u from (seed, step) ahead of time
(`inject_noise(..., draw_later=True)`: the wrong token's slot holds a placeholder, the draw is
kept in `Trajectory.draws`), so lengths and stack structures are planned as usual. At the step,
`draw_noise_from_model` fills in the wrong tokens from the current policy: one no-grad forward
of the batch under the step's own plan (`run_plan(..., read_logits=...)`). With backspace
semantics the output at the position just before a wrong token (the clean token x_{j-1}, whose
context is the clean prefix: earlier pairs are popped) is exactly p(. | x_<j), and it does not
read the placeholders (they come after it, or are popped). The rank that holds that position
draws the token with u (`draw_wrong_tokens`), and one all-reduce per step over a vector with
one slot per insertion of the global batch (its size known to every rank from the batch)
shares the ids with every rank.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from hetsp.objectives.sequencematch import Trajectory


def inject_noise(
    ids: Sequence[int],
    p: float,
    rng: random.Random,
    bkspc_id: int,
    num_real: int,
    prompt_length: int = 0,
    proposals: torch.Tensor | None = None,
    max_length: int | None = None,
    draw_later: bool = False,
) -> Trajectory:
    """`ids` with (wrong token, `<bkspc>`) pairs inserted, as a `Trajectory` (noise mask, prompt).

    num_real: wrong tokens are drawn from ids [0, num_real) (the vocabulary without `<bkspc>`
    and whatever follows it); proposals: (len(ids), V) logits for noise_source = "model";
    max_length: cut the result to at most this many tokens (a cut sequence is not done);
    draw_later: the model's draw is made later (`draw_noise_from_model`): each wrong token's
    slot holds its target as a placeholder and `Trajectory.draws` gets (position, u, target),
    with u taken from `rng` where `proposals` would take it (the same rng gives the same u's).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"noise probability p = {p}: must lie in [0, 1)")
    if bkspc_id in ids:
        raise ValueError("inject_noise takes clean sequences; this one already holds <bkspc>")
    if num_real < 2:
        raise ValueError(f"num_real = {num_real}: a wrong token needs at least two real tokens to choose from")
    first = max(1, prompt_length)
    if len(ids) <= first:
        raise ValueError(
            f"a sequence of {len(ids)} tokens with a prompt of {prompt_length} has no target token: "
            "it would be all noise (drop it, or give it a completion)"
        )
    if proposals is not None and proposals.shape[0] != len(ids):
        raise ValueError(f"proposals cover {proposals.shape[0]} positions, the sequence has {len(ids)}")
    if draw_later and proposals is not None:
        raise ValueError("inject_noise: draw_later defers the model's draw; give no proposals with it")
    out, noise = list(ids[:first]), [False] * first
    draws: list[tuple[int, float, int]] = []
    for j in range(first, len(ids)):
        target = int(ids[j])
        if rng.random() < p:
            if draw_later:
                draws.append((len(out), rng.random(), target))
                wrong = target  # placeholder, replaced by the model's draw before training
            else:
                wrong = _wrong_token(target, rng, num_real, bkspc_id, None if proposals is None else proposals[j - 1])
            out += [wrong, bkspc_id]
            noise += [True, False]
        out.append(target)
        noise.append(False)
    if max_length is not None and len(out) > max_length:
        out, noise = out[:max_length], noise[:max_length]
        draws = [d for d in draws if d[0] < max_length]
    if not any(not noise[j] for j in range(first, len(out))):
        raise ValueError(f"after the cut to {max_length} tokens every action is injected noise; raise max_length or lower p")
    return Trajectory(out, noise, prompt_length=prompt_length, draws=draws)


def _wrong_token(target: int, rng: random.Random, num_real: int, bkspc_id: int, logits: torch.Tensor | None) -> int:
    if logits is None:
        t = rng.randrange(num_real - 1)
        return t + (t >= target) if 0 <= target < num_real else t
    return draw_wrong_tokens(logits[None], [target], [rng.random()], num_real, bkspc_id)[0]


def draw_wrong_tokens(logits_KV: torch.Tensor, targets: Sequence[int], us: Sequence[float], num_real: int,
                      bkspc_id: int) -> list[int]:
    """K wrong tokens from the model: row k is drawn from softmax(logits_KV[k]) over ids [0, num_real)
    with targets[k] and `<bkspc>` excluded (renormalised), as the first id whose cumulative
    probability exceeds us[k]; everything in fp64 on the CPU (the same sums whichever rank draws)."""
    scores = logits_KV.detach().to("cpu", torch.float64)[:, :num_real].clone()
    rows = torch.arange(scores.shape[0])
    tgt = torch.as_tensor(list(targets), dtype=torch.long)
    inside = tgt < num_real
    scores[rows[inside], tgt[inside]] = float("-inf")
    if bkspc_id < num_real:
        scores[:, bkspc_id] = float("-inf")
    probs = torch.softmax(scores, 1)
    cum = probs.cumsum(1)
    u = torch.as_tensor(list(us), dtype=torch.float64)[:, None]
    picked = torch.searchsorted(cum, u, right=True)[:, 0]  # the first t with u < cum[t]
    beyond = picked >= num_real  # u at or past the rounded total: the likeliest token
    picked[beyond] = probs[beyond].argmax(1)
    return [int(t) for t in picked]


def as_trajectory(seq: Sequence[int]) -> Trajectory:
    """A training sequence as a clean `Trajectory`: a prompt/completion example (a per-token
    `trainable` mask: False on the prompt, then True) keeps its prompt as `prompt_length`; a mask
    with gaps (several assistant turns) is refused."""
    if isinstance(seq, Trajectory):
        return seq
    trainable = getattr(seq, "trainable", None)
    if trainable is None:
        return Trajectory(list(seq))
    first = next((t for t in range(1, len(trainable)) if trainable[t]), len(trainable))
    if not all(trainable[first:]):
        raise NotImplementedError(
            "sequencematch trains a prompt and one completion per sequence; this example has several trainable "
            "spans (a conversation with several assistant turns): use data.format = 'prompt_completion' or 'text'")
    return Trajectory(list(seq), prompt_length=first if first > 1 else 0)


class NoisyData:
    """The data module of a SequenceMatch run: the wrapped module's global batches as `Trajectory`
    objects with (wrong token, `<bkspc>`) pairs injected, drawn from (seed, step) alone, so every rank
    builds the same batch and a resumed run gets the same noise. The planner sees the noisy lengths
    (`train_batch_lengths`). Held-out batches stay clean. Every other attribute is the wrapped
    module's (tokenizer, vocab_size, stats, epoch_of...). source = "model": the wrong tokens are
    left to draw at the step (`Trajectory.draws`, filled by `draw_noise_from_model`)."""

    def __init__(self, inner, p: float, bkspc_id: int, num_real: int, source: str = "uniform") -> None:
        if source not in ("uniform", "model"):
            raise ValueError(f"noise source {source!r}: 'uniform' or 'model'")
        self.inner = inner
        self.p = p
        self.bkspc_id = bkspc_id
        self.num_real = num_real
        self.source = source
        self._recent: dict[int, list[Trajectory]] = {}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def train_batch(self, step: int) -> list[Trajectory]:
        if step in self._recent:  # planned ahead (its lengths), then trained: built once
            return list(self._recent[step])
        clean = [as_trajectory(s) for s in self.inner.train_batch(step)]
        if self.p == 0.0:
            return clean
        rng = random.Random(f"{self.inner.seed}:noise:{step}")
        later = self.source == "model"
        batch = [inject_noise(s, self.p, rng, self.bkspc_id, self.num_real, s.prompt_length, draw_later=later) for s in clean]
        self._recent[step] = batch
        while len(self._recent) > 2:  # the step being trained and the one planned ahead
            del self._recent[min(self._recent)]
        return list(batch)

    def train_batch_lengths(self, step: int) -> list[int]:
        if self.p == 0.0:
            return self.inner.train_batch_lengths(step)
        return [len(s) for s in self.train_batch(step)]

    def val_batches(self, num: int) -> list[list[Trajectory]]:
        return [[as_trajectory(s) for s in batch] for batch in self.inner.val_batches(num)]


@torch.no_grad()
def draw_noise_from_model(engine, plan, batch: Sequence[Trajectory], rank: int, world_size: int, device,
                          objective, kernel: str, num_real: int) -> list[Trajectory]:
    """`batch` with every pending wrong token (`Trajectory.draws`) drawn from the current policy
    (module docstring). Every rank of the world must call it with the same batch and `plan` (the
    step's plan, over exactly these sequences): one no-grad forward under `plan`, then ONE
    all-reduce over a (K, 2) int64 vector, K the insertions of the whole batch (the same on every
    rank: the batch is), every rank taking part even when it holds none of them."""
    import torch.distributed as dist

    from hetsp.executor import run_plan

    draws = [list(getattr(s, "draws", ())) for s in batch]
    K = sum(len(d) for d in draws)
    if K == 0:
        return list(batch)
    bk = objective.bkspc_token_id
    # slot of each position whose output is the draw's distribution: the token before the wrong one
    offsets = [0]
    for s in batch:
        offsets.append(offsets[-1] + len(s))
    slot_at = torch.full((offsets[-1],), -1, dtype=torch.long)
    us, targets = [], []
    for i, d in enumerate(draws):
        for pos, u, target in d:
            slot_at[offsets[i] + pos - 1] = len(us)
            us.append(u)
            targets.append(target)
    offsets_t = torch.tensor(offsets[:-1], dtype=torch.long)
    got = torch.zeros((K, 2), dtype=torch.long)  # (token id, 1) in the slot's row, on the rank holding it

    def read(m: int, inputs, logits_TV: torch.Tensor) -> None:
        if not inputs.weight:
            return
        seqs = torch.tensor(plan.micro_batches[m].seqs(), dtype=torch.long)
        slot_t, pos_t = inputs.seq_slot.cpu(), inputs.seq_pos.cpu()
        real = slot_t >= 0
        flat = offsets_t[seqs[slot_t[real]]] + pos_t[real]
        slots = slot_at[flat]
        rows = torch.nonzero(real).flatten()[slots >= 0]
        slots = slots[slots >= 0]
        if len(slots):
            ids = draw_wrong_tokens(logits_TV[rows.to(logits_TV.device)], [targets[k] for k in slots.tolist()],
                                    [us[k] for k in slots.tolist()], num_real, bk)
            got[slots, 0] = torch.tensor(ids, dtype=torch.long)
            got[slots, 1] += 1

    pending = [Trajectory(list(s), s.noise, s.prompt_length, s.source) for s in batch]  # placeholders, no draws
    model = getattr(engine, "module", engine)
    was_training = model.training
    model.train(False)
    try:
        run_plan(engine, plan, pending, rank, world_size, device, objective, kernel, train=False,
                 structures=objective.structures(pending), read_logits=read)
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        on = got.to(device)  # NCCL reduces device tensors; gloo CPU ones
        dist.all_reduce(on)
        got = on.cpu()
    if not bool((got[:, 1] == 1).all()):
        missing = torch.nonzero(got[:, 1] != 1).flatten().tolist()
        raise RuntimeError(f"the plan held {len(missing)} of {K} noise draws on no rank or on several ranks "
                           f"(slots {missing[:5]}...): is it the plan of this batch?")
    out, k = [], 0
    for s, d in zip(batch, draws):
        ids = list(s)
        for pos, _u, _target in d:
            ids[pos] = int(got[k, 0])
            k += 1
        out.append(Trajectory(ids, s.noise, s.prompt_length, s.source))
    return out
