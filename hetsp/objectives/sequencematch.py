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

from typing import Any, Sequence

import torch

from hetsp.objectives.base import IGNORE_INDEX, Objective
from hetsp.objectives.config import SequenceMatchConfig

# per-token inputs (the order of the columns of `tokens["coef"]`); "model": 1 on an action of a
# model-generated trajectory (used only to split the metrics)
COEFS = ("ce", "pos", "sq", "val", "cont", "model")
# per-step metrics: the loss split into its terms (sums of token losses)
PARTS = ("sm_ml", "sm_reward", "sm_chi2", "sm_value_data", "sm_value_model")


class Trajectory(list):
    """Token ids of one trajectory with what SequenceMatch needs besides the ids.

    noise: per token, True for an injected wrong token (its action is masked out of the loss);
    prompt_length: the first tokens are the prompt (no action scored before the last of them);
    source: "data" or "model" (a model-generated trajectory: the mixture's other half);
    draws: (position, u, target) of each wrong token still to be drawn from the model
    (`hetsp.data.noise.draw_noise_from_model`; its slot holds a placeholder until then).
    """

    def __init__(self, ids, noise=None, prompt_length: int = 0, source: str = "data", draws=()) -> None:
        super().__init__(ids)
        self.noise = [False] * len(self) if noise is None else [bool(x) for x in noise]
        if len(self.noise) != len(self):
            raise ValueError(f"noise mask of {len(self.noise)} entries for {len(self)} tokens")
        if source not in ("data", "model"):
            raise ValueError(f"trajectory source must be 'data' or 'model', got {source!r}")
        self.prompt_length = int(prompt_length)
        self.source = source
        self.draws = list(draws)


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
    ce, pos, sq, val, cont = coef_TC[:, :5].unbind(1)
    nxt = cont * next_value_T
    r = chosen - nxt
    loss = ce * (value - chosen) - pos * r + sq * r * r + val * (value - nxt)
    return torch.where(has, loss, torch.zeros_like(loss))


@torch.no_grad()
def loss_parts(logits_TV: torch.Tensor, labels_T: torch.Tensor, coef_TC: torch.Tensor, next_value_T: torch.Tensor,
               value_T: torch.Tensor) -> torch.Tensor:
    """The sums over tokens of the terms of `token_losses`, in the order of PARTS. Shape (len(PARTS),)."""
    has = (labels_T != IGNORE_INDEX).to(logits_TV.dtype)
    chosen = logits_TV.gather(1, labels_T.clamp(min=0)[:, None])[:, 0]
    ce, pos, sq, val, cont, model = coef_TC.unbind(1)
    nxt = cont * next_value_T
    r = chosen - nxt
    vterm = val * (value_T - nxt)
    terms = torch.stack([ce * (value_T - chosen), -pos * r, sq * r * r, vterm * (1 - model), vterm * model])
    return torch.where(has > 0, terms, torch.zeros_like(terms)).sum(1).to(torch.float64)


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
                out.append([0.0, 0.0, s * cfg.chi2 * g, s * (1 - cfg.w_data) * g, cont, 1.0])
            else:
                out.append([(1 - s) * m, s * g * m, s * cfg.chi2 * g * m, s * cfg.w_data * g, cont, 0.0])
            i = 0 if done else i + 1
        return out

    def token_inputs(self, seq: Sequence[int]) -> dict[str, list]:
        if getattr(seq, "draws", None):
            raise NotImplementedError(
                "this batch still holds placeholders for wrong tokens to draw from the model (objective.noise_source = "
                "'model'): call SequenceMatch.step_batch, which draws them under the step's plan, before run_plan")
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
        if torch.is_grad_enabled() and getattr(self, "_sums", None) is not None:  # training steps only
            self._sums += loss_parts(logits.detach(), inputs.labels, coef, next_value.detach(), value.detach()).cpu()
        return loss + full.sum() * 0.0  # every rank's backward joins the exchange's all-reduce

    # ---- the training loop's hooks (hetsp.train)
    def build_data(self, cfg: Any, seed: int) -> Any:
        """The configured corpus with `<bkspc>` added to its tokenizer, served with injected noise
        (`hetsp.data.noise.NoisyData`); sets the objective's EOS and `<bkspc>` ids."""
        from hetsp.data import build_data
        from hetsp.data.noise import NoisyData
        from hetsp.data.tokenizer import ByteTokenizer, add_bkspc

        c = self.config
        c.check_for_training()
        data = build_data(cfg.data, seed)
        tok = add_bkspc(data.tokenizer)
        data.tokenizer, data.vocab_size = tok, tok.vocab_size
        self.eos_token_id, self.bkspc_token_id, self.vocab_size = tok.eos_token_id, tok.bkspc_token_id, tok.vocab_size
        num_real = 256 if isinstance(tok, ByteTokenizer) else tok.bkspc_token_id  # wrong tokens: bytes / the real vocabulary
        return NoisyData(data, c.noise_p, tok.bkspc_token_id, num_real, c.noise_source)

    def sampling_step(self, step: int) -> bool:
        """Whether step `step` samples model-generated trajectories (every `sample_every` steps from
        the end of behaviour cloning, whose loss would give them no weight)."""
        c = self.config
        return bool(c.sample_every) and step >= c.bc_steps and (step - c.bc_steps) % c.sample_every == 0

    def makes_batch(self, step: int) -> bool:
        return self.sampling_step(step)

    def train_batch(self, ctx: Any, step: int) -> list | None:
        """On a sampling step, the step's (noisy) data batch plus trajectories sampled from the current
        policy (`hetsp.objectives.sm_sampling`, every rank taking part); else None (the data module's
        batch, planned ahead)."""
        if not self.sampling_step(step):
            return None
        from hetsp.objectives.sm_sampling import sample_round

        batch = ctx.data.train_batch(step)
        return batch + sample_round(self, ctx, step, batch)

    def step_batch(self, ctx: Any, plan: Any, batch: list) -> list:
        """Draws the wrong tokens left to the model (noise_source = "model": one no-grad forward under
        `plan`, `hetsp.data.noise.draw_noise_from_model`, every rank taking part) and starts the
        step's metric sums (`finish_metrics`)."""
        import time

        draw_s = 0.0  # seconds drawing wrong tokens from the model (none to draw: 0)
        if any(getattr(s, "draws", None) for s in batch):  # the same batch, hence the same answer, on every rank
            from hetsp.data.noise import draw_noise_from_model

            t0 = time.perf_counter()
            batch = draw_noise_from_model(ctx.engine, plan, batch, ctx.rank, ctx.world_size, ctx.device, self, ctx.kernel,
                                          ctx.data.num_real)
            draw_s = time.perf_counter() - t0
        self._sums = torch.zeros(len(PARTS), dtype=torch.float64)
        data = [s for s in batch if getattr(s, "source", "data") == "data"]
        model = [s for s in batch if getattr(s, "source", "data") == "model"]
        noise = sum(sum(getattr(s, "noise", ())) for s in data)
        self._info = {"units": float(self.num_units(batch)), "noise_frac": noise / max(1, self.num_units(data)),
                      "model_trajectories": float(len(model)),
                      "model_pops": float(sum(t == self.bkspc_token_id for s in model for t in s[s.prompt_length:])),
                      "noise_draw_s": draw_s}
        return batch

    def finish_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The step's loss split into its terms per unit (they add up to the loss; one all-reduce, every
        rank calls it), the SequenceMatch weight, the fraction of data actions that are injected noise,
        how many model-generated trajectories (and pops in them) the step trained on, and the seconds
        spent drawing wrong tokens from the model (noise_source = "model"; this rank's)."""
        if getattr(self, "_sums", None) is None:
            return {}
        total = self._sums.clone()
        _all_reduce(total)
        self._sums = None
        out = {name: float(v) / max(1.0, self._info["units"]) for name, v in zip(PARTS, total.tolist())}
        out.update(sm_weight=self.sm_weight(), noise_frac=self._info["noise_frac"],
                   model_trajectories=self._info["model_trajectories"], model_pops=self._info["model_pops"],
                   noise_draw_s=self._info["noise_draw_s"])
        return out

    def structures(self, batch: Sequence[Any]) -> list | None:
        """The stack structure of every sequence holding a `<bkspc>` (None for the others)."""
        from hetsp.backspace import stack_structure

        bk = self.bkspc_token_id
        if bk is None:
            return None
        vocab = getattr(self, "vocab_size", bk + 1)
        out = [stack_structure(s, bk, vocab, getattr(s, "prompt_length", 0)) if bk in s else None for s in batch]
        return out if any(o is not None for o in out) else None


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


def bkspc_vocab_size(tokenizer: Any, rows: int) -> int | None:
    """The vocabulary size a checkpoint of `rows` token rows must be loaded with for a run whose
    tokenizer has `<bkspc>`: rows + 1 when it lacks the row (the id is the first one past its rows;
    `hetsp.loading.load_pretrained` adds it, mean-initialised as `add_bkspc_rows` does), else None
    (no `<bkspc>`, or a checkpoint that has the row: an exported SequenceMatch model)."""
    bk = getattr(tokenizer, "bkspc_token_id", None)
    return rows + 1 if bk is not None and bk == rows else None


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
