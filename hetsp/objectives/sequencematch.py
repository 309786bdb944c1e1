"""SequenceMatch (REFERENCE.md section 4): imitation learning with a `<bkspc>` action and the
chi^2-mixture divergence. The unit is a target token (a position with an action to score).

Q-values are the model's raw logits: Q(s_j, a) = logits[j, a], V(s_j) = logsumexp_a logits[j, a]
over the whole vocabulary (`<bkspc>` included). Position j's action a_j is token j + 1; it
leads to the state of position j + 1 (the context of a `<bkspc>` holds the `<bkspc>` itself), so
the next value is always the output at the next position of the same sequence, in sequence
order (not the tree child). Implicit reward

    r_j = l_j - gamma V_{j+1} (1 - done_j),    l_j = logits[j, a_j],

done_j only when a_j is a real end of sequence (EOS); a sequence cut by the context window
is not done, so its last action still looks at V of the last position.

Every per-token coefficient is computed on the whole sequence before layout (`token_inputs`):

    loss_j = ce_j (V_j - l_j) + pos_j (-r_j) + sq_j r_j^2 + val_j (V_j - cont_j V_{j+1})

with cont_j = gamma (1 - done_j), and, with g_j = gamma^i (i counts the actions of the
episode) and m_j = 0 on an injected wrong token (1 otherwise):
  data trajectory:  pos = s g m,  sq = s c g m,  val = s w_data g,  ce = (1 - s) m
  model trajectory: pos = 0,      sq = s c g,    val = s (1 - w_data) g,  ce = 0
where s is the SequenceMatch weight of the schedule: 0 for the first `bc_steps` steps
(behaviour cloning, i.e. maximum likelihood), then `alpha` (loss = (1 - alpha) ML + alpha SM).

V_{j+1} may sit on another rank of the group: every rank scatters the values of its tokens
into one vector over the micro-batch's tokens and all-reduces it (`ExchangeValues`: the
backward all-reduces the gradients), one collective per micro-batch, exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from hetsp.objectives.base import IGNORE_INDEX, Objective

# per-token inputs (the order of the columns of `tokens["coef"]`)
COEFS = ("ce", "pos", "sq", "val", "cont")


class Trajectory(list):
    """Token ids of one trajectory with what SequenceMatch needs besides the ids.

    noise: per token, True for an injected wrong token (its action is masked out of the loss);
    prompt_length: the first tokens are the prompt (no action scored before the last of them);
    source: "data" or "model" (a model-generated trajectory: the mixture's other half).
    """

    def __init__(self, ids, noise=None, prompt_length: int = 0, source: str = "data") -> None:
        super().__init__(ids)
        self.noise = [False] * len(self) if noise is None else [bool(x) for x in noise]
        if len(self.noise) != len(self):
            raise ValueError(f"noise mask of {len(self.noise)} entries for {len(self)} tokens")
        if source not in ("data", "model"):
            raise ValueError(f"trajectory source must be 'data' or 'model', got {source!r}")
        self.prompt_length = int(prompt_length)
        self.source = source


@dataclass(frozen=True)
class SequenceMatchConfig:
    """The typed [objective] section of `train.objective = "sequencematch"`."""

    gamma: float = 0.998  # discount, in (0, 1]
    chi2: float = 0.5  # c, the coefficient of r^2 (0: no chi^2 term)
    w_data: float = 1.0  # weight of the value term on data; 1/2 for the chi^2-mixture
    alpha: float = 0.01  # SequenceMatch weight after behaviour cloning: (1 - alpha) ML + alpha SM
    bc_steps: int = 0  # K: behaviour cloning (maximum likelihood) for the first K steps
    noise_p: float = 0.0  # probability of an injected (wrong token, <bkspc>) before each target
    noise_source: str = "uniform"  # "uniform" or "model"

    def __post_init__(self) -> None:
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

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SequenceMatchConfig":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"[objective] for sequencematch: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


class ExchangeValues(torch.autograd.Function):
    """Forward: scatter this rank's values at `index` into a zero vector of `size` and all-reduce
    (sum) it, so every rank holds every token's value. Backward: all-reduce the gradients of
    the vector (every rank's loss uses it) and gather this rank's entries."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        full = values.new_zeros(size).index_add(0, index, values)
        _all_reduce(full)
        ctx.save_for_backward(index)
        return full

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad = grad_full.contiguous().clone()
        _all_reduce(grad)
        return grad[index], None, None


def _all_reduce(t: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from hetsp.metrics.timing import COMM_WAIT

        with COMM_WAIT.measure():
            dist.all_reduce(t)


def token_losses(logits_TV: torch.Tensor, labels_T: torch.Tensor, coef_TC: torch.Tensor, next_value_T: torch.Tensor,
                 value_T: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token SequenceMatch losses (module docstring) from raw logits; zero where labels are IGNORE."""
    has = labels_T != IGNORE_INDEX
    value = torch.logsumexp(logits_TV, dim=-1) if value_T is None else value_T
    chosen = logits_TV.gather(1, labels_T.clamp(min=0)[:, None])[:, 0]
    ce, pos, sq, val, cont = coef_TC.unbind(1)
    nxt = cont * next_value_T
    r = chosen - nxt
    loss = ce * (value - chosen) - pos * r + sq * r * r + val * (value - nxt)
    return torch.where(has, loss, torch.zeros_like(loss))


class SequenceMatch(Objective):
    """The objective `train.objective = "sequencematch"` (see the module docstring)."""

    name = "sequencematch"
    unit = "target tokens"
    next_position_outputs = ("value",)  # V_{j+1}: exchanged by the executor (`NextIndex`)
    # The per-token inputs of a token without an action (filler, placeholder).
    token_fill = {"labels": IGNORE_INDEX, "coef": [0.0] * len(COEFS)}

    def __init__(self, config: SequenceMatchConfig | None = None, eos_token_id: int = -1, bkspc_token_id: int | None = None) -> None:
        super().__init__(config or SequenceMatchConfig())
        self.config = self.cfg
        self.eos_token_id = eos_token_id
        self.bkspc_token_id = bkspc_token_id
        self.step = 0

    # ---- schedule
    def set_step(self, step: int) -> None:
        """The training step (the schedule: behaviour cloning for the first `bc_steps` steps)."""
        self.step = int(step)

    def sm_weight(self) -> float:
        return 0.0 if self.step < self.config.bc_steps else self.config.alpha

    # ---- per-token inputs, on the whole sequence before layout
    @staticmethod
    def labels(seq: Sequence[int]) -> list[int]:
        """Position j's action is token j + 1; the last token and the prompt have none."""
        trainable = getattr(seq, "trainable", None)
        if trainable is not None and not all(trainable[max(1, getattr(seq, "prompt_length", 0)):]):
            raise NotImplementedError(
                "sequencematch takes a prompt as Trajectory(ids, prompt_length=...), not a per-token trainable "
                "mask with gaps (a chat transcript); convert the example to a prompt and one completion")
        start = max(0, getattr(seq, "prompt_length", 0) - 1)
        return [IGNORE_INDEX] * start + list(seq[start + 1:]) + [IGNORE_INDEX] * (len(seq) > start)

    def token_coefs(self, seq: Sequence[int]) -> list[list[float]]:
        """Per position, the coefficients COEFS (zeros where there is no action)."""
        cfg = self.config
        s = self.sm_weight()
        labels = self.labels(seq)
        noise = getattr(seq, "noise", None) or [False] * len(seq)
        model = getattr(seq, "source", "data") == "model"
        out = []
        i = 0  # action index within the episode (reset after an EOS action)
        for j, a in enumerate(labels):
            if a == IGNORE_INDEX:
                out.append([0.0] * len(COEFS))
                continue
            g = cfg.gamma ** i
            m = 0.0 if noise[j + 1] else 1.0
            done = a == self.eos_token_id
            cont = 0.0 if done else cfg.gamma
            if model:
                out.append([0.0, 0.0, s * cfg.chi2 * g, s * (1 - cfg.w_data) * g, cont])
            else:
                out.append([(1 - s) * m, s * g * m, s * cfg.chi2 * g * m, s * cfg.w_data * g, cont])
            i = 0 if done else i + 1
        return out

    def token_inputs(self, seq: Sequence[int]) -> dict[str, list]:
        return {"labels": self.labels(seq), "coef": self.token_coefs(seq)}

    def num_units(self, examples: Sequence[Any]) -> int:
        """Positions with an action (target tokens), noise actions included (their value term trains);
        given sequences, or their lengths (every position but the last)."""
        return sum(max(0, e - 1) if isinstance(e, int) else sum(a != IGNORE_INDEX for a in self.labels(e)) for e in examples)

    # ---- the loss on this rank's tokens
    def token_loss_exchanged(self, logits_TV: torch.Tensor, inputs: Any) -> torch.Tensor:
        """This rank's sum of token losses; V_{j+1} comes through one all-reduce per micro-batch."""
        logits = logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32))
        value = torch.logsumexp(logits, dim=-1)
        ex = inputs.exchange
        full = ExchangeValues.apply(value[ex.own_local], ex.own_index, ex.size)
        next_value = full[ex.next_index]
        coef = inputs.tokens["coef"].to(logits.dtype)
        loss = token_losses(logits, inputs.labels, coef, next_value, value).sum()
        return loss + full.sum() * 0.0  # every rank's backward joins the exchange's all-reduce


def reference_loss(logits_list: Sequence[torch.Tensor], sequences: Sequence[Sequence[int]], objective: SequenceMatch) -> torch.Tensor:
    """REFERENCE.md's formula written per position (slow, one process): the sum over `sequences`
    of sum_i g^i m_i (-r_i + c r_i^2) + w sum_i g^i (V_i - g V_{i+1} (1 - done_i)), mixed with
    maximum likelihood by the schedule. `logits_list[k]` is (len, V) for sequence k."""
    cfg = objective.config
    s = objective.sm_weight()
    total = logits_list[0].new_zeros(())
    for logits, seq in zip(logits_list, sequences):
        noise = getattr(seq, "noise", [False] * len(seq))
        model = getattr(seq, "source", "data") == "model"
        start = max(0, getattr(seq, "prompt_length", 0) - 1)
        i = 0
        for j in range(start, len(seq) - 1):
            a = seq[j + 1]
            V = torch.logsumexp(logits[j], 0)
            Vn = torch.logsumexp(logits[j + 1], 0)
            done = a == objective.eos_token_id
            r = logits[j, a] - (0.0 if done else cfg.gamma * Vn)
            vterm = V - (0.0 if done else cfg.gamma * Vn)
            g = cfg.gamma ** i
            m = 0.0 if noise[j + 1] else 1.0
            if model:
                total = total + s * (g * cfg.chi2 * r * r + (1 - cfg.w_data) * g * vterm)
            else:
                sm = g * m * (-r + cfg.chi2 * r * r) + cfg.w_data * g * vterm
                total = total + s * sm + (1 - s) * m * (V - logits[j, a])
            i = 0 if done else i + 1
    return total


def add_bkspc_rows(model: Any, vocab_size: int) -> Any:
    """Grow `model`'s input embedding and output layer to `vocab_size` rows for the `<bkspc>` id
    (hetsp.data.tokenizer.add_bkspc), each new row the mean of the existing rows (embedding and
    untied output rows alike; an output bias gets the mean bias). The config's vocab_size follows,
    so checkpoints and hetsp-export save the grown model. A no-op when it already has the rows."""
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if vocab_size == old:
        return model
    if vocab_size < old:
        raise ValueError(f"the model has {old} embedding rows, more than the {vocab_size} ids asked for")
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb.weight
    with torch.no_grad():
        emb_mean = emb.weight.mean(0, keepdim=True)
        out_mean = None if out is None or tied else out.weight.mean(0, keepdim=True)
        bias_mean = None if out is None or getattr(out, "bias", None) is None else out.bias.mean()
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = emb_mean
        new_out = model.get_output_embeddings()
        if out_mean is not None:
            new_out.weight[old:] = out_mean
        if bias_mean is not None:
            new_out.bias[old:] = bias_mean
    model.config.vocab_size = vocab_size
    return model


@torch.no_grad()
def sample_trajectory(model: Any, prompt: Sequence[int], bkspc_id: int, eos_token_id: int, max_new_tokens: int,
                      generator: torch.Generator | None = None, temperature: float = 1.0) -> Trajectory:
    """One model-generated trajectory for the mixture term: sample over the vocabulary plus `<bkspc>`
    from the current policy (a `<bkspc>` pops, never into the prompt), stop after EOS or
    `max_new_tokens` actions (then not done). The trajectory holds every action, pops included,
    as the training sequence (`source = "model"`). `model`: a HybridForCausalLM (one sequence)."""
    from models.backspace_decoding import BackspaceDecoder

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: a trajectory needs at least one action")
    dec = BackspaceDecoder(model, bkspc_id)
    logits = dec.prefill(prompt)
    actions: list[int] = []
    for _ in range(max_new_tokens):
        scores = logits.double() / temperature
        if not dec.can_pop():
            scores[bkspc_id] = float("-inf")
        a = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))
        actions.append(a)
        if a == eos_token_id:
            break
        logits = dec.step(a)
    return Trajectory(list(prompt) + actions, prompt_length=len(prompt), source="model")
