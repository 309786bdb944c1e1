"""Noise injection for SequenceMatch (REFERENCE.md section 4): before a target token, with
probability p, insert a wrong token followed by `<bkspc>`. The wrong token's action is masked
out of the loss (`Trajectory.noise`); the `<bkspc>` and everything after it are trained.

The wrong token is drawn uniformly from the real tokens other than the target, or from the
model: `proposals[j]` are the model's logits before clean token j (its output at clean
position j - 1, one forward on the clean sequence), with the target and `<bkspc>` excluded.
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
) -> Trajectory:
    """`ids` with (wrong token, `<bkspc>`) pairs inserted, as a `Trajectory` (noise mask, prompt).

    num_real: wrong tokens are drawn from ids [0, num_real) (the vocabulary without `<bkspc>`
    and whatever follows it); proposals: (len(ids), V) logits for noise_source = "model";
    max_length: cut the result to at most this many tokens (a cut sequence is not done).
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
    out, noise = list(ids[:first]), [False] * first
    for j in range(first, len(ids)):
        target = int(ids[j])
        if rng.random() < p:
            out += [_wrong_token(target, rng, num_real, bkspc_id, None if proposals is None else proposals[j - 1]), bkspc_id]
            noise += [True, False]
        out.append(target)
        noise.append(False)
    if max_length is not None and len(out) > max_length:
        out, noise = out[:max_length], noise[:max_length]
    if not any(not noise[j] for j in range(first, len(out))):
        raise ValueError(f"after the cut to {max_length} tokens every action is injected noise; raise max_length or lower p")
    return Trajectory(out, noise, prompt_length=prompt_length)


def _wrong_token(target: int, rng: random.Random, num_real: int, bkspc_id: int, logits: torch.Tensor | None) -> int:
    if logits is None:
        t = rng.randrange(num_real - 1)
        return t + (t >= target) if 0 <= target < num_real else t
    scores = logits.detach().double().cpu()[:num_real].clone()
    scores[target] = float("-inf") if target < num_real else scores[target]
    if bkspc_id < num_real:
        scores[bkspc_id] = float("-inf")
    probs = torch.softmax(scores, 0)
    u, acc = rng.random(), 0.0
    for t, q in enumerate(probs.tolist()):
        acc += q
        if u < acc:
            return t
    return int(probs.argmax())


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
    module's (tokenizer, vocab_size, stats, epoch_of...)."""

    def __init__(self, inner, p: float, bkspc_id: int, num_real: int) -> None:
        self.inner = inner
        self.p = p
        self.bkspc_id = bkspc_id
        self.num_real = num_real

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def train_batch(self, step: int) -> list[Trajectory]:
        clean = [as_trajectory(s) for s in self.inner.train_batch(step)]
        if self.p == 0.0:
            return clean
        rng = random.Random(f"{self.inner.seed}:noise:{step}")
        return [inject_noise(s, self.p, rng, self.bkspc_id, self.num_real, s.prompt_length) for s in clean]

    def train_batch_lengths(self, step: int) -> list[int]:
        if self.p == 0.0:
            return self.inner.train_batch_lengths(step)
        return [len(s) for s in self.train_batch(step)]

    def val_batches(self, num: int) -> list[list[Trajectory]]:
        return [[as_trajectory(s) for s in batch] for batch in self.inner.val_batches(num)]
