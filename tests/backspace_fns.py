"""Random and hand-made `<bkspc>` structures for the tests (importable by the rank pool)."""

from __future__ import annotations

import random

BK = 9  # the <bkspc> id of the tests' small vocabularies (vocab_size >= 10)


def random_backspace_ids(rng: random.Random, n: int, prompt: int, bk: int = BK, vocab: int = 8, p_pop: float = 0.25) -> list[int]:
    """A valid random sequence of n tokens: isolated pops and runs of pops, never into the prompt."""
    ids, generated = [], 0
    for j in range(n):
        if j >= prompt and generated > 0 and rng.random() < p_pop:
            ids.append(bk)
            generated -= 1
        else:
            ids.append(rng.randrange(vocab))
            generated += j >= prompt
    return ids


def deep_pop_ids(n: int, bk: int = BK, vocab: int = 8) -> list[int]:
    """n tokens: the first half pushed, then a run of pops back to a quarter of the sequence, then pushes.

    On a group of d ranks (2d zigzag chunks), the tokens after the run have their parent
    several chunks (and shards) back, and pops fall right at chunk boundaries."""
    half, back = n // 2, n // 4
    ids = [(3 * j + 1) % vocab for j in range(half)]
    ids += [bk] * min(half - back, n - half)
    ids += [(5 * j + 2) % vocab for j in range(n - len(ids))]
    return ids


def inserted_pairs_ids(rng: random.Random, n: int, frac: float, bk: int = BK, vocab: int = 8) -> list[int]:
    """n tokens in which about `frac` of the positions are inserted (wrong token, <bkspc>) pairs."""
    ids: list[int] = []
    while len(ids) < n:
        if len(ids) >= 1 and len(ids) + 2 <= n and rng.random() < frac:
            ids += [rng.randrange(vocab), bk]
        else:
            ids.append(rng.randrange(vocab))
    return ids


# ---------------------------------------------------------------- whole plans through the executor

def _model(family, model_kwargs, attn):
    import types

    import torch

    from .ssm_fns import _build
    from .step_fns import _rmsnorm_in_input_dtype

    model = _build(family, model_kwargs, attn, 1234).to(torch.float64)
    for m in model.modules():  # transformers' Llama RMSNorm computes in fp32; keep fp64 exact
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = types.MethodType(_rmsnorm_in_input_dtype, m)
    return model


def plan_steps(cases, family, model_kwargs, kernel, objective=None):
    """For each (sequences, structures, plan_json): (local loss sum, num units, local grads) through
    `run_plan` with ring attention and the SSM layers parallelised (`objective`: language modelling
    when None)."""
    import torch
    import torch.distributed as dist

    from hetsp.attention import register_attention
    from hetsp.executor import PlainEngine, run_plan
    from hetsp.objectives.lm import LanguageModeling
    from hetsp.plan import Plan
    from hetsp.ssm_parallel import parallelize

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for sequences, structures, plan_json in cases:
        model = parallelize(_model(family, model_kwargs, register_attention()))
        plan = Plan.from_json(plan_json).validate(world)
        obj = LanguageModeling() if objective is None else objective
        res = run_plan(PlainEngine(model), plan, sequences, rank, world, torch.device("cpu"), obj, kernel, structures=structures)
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
        out.append((res.loss_sum, res.num_units, grads))
    return out


def assert_plans_match(results, num_plans, ref_loss, ref_grads, tol):
    """Every plan's loss (sum over ranks / units) and gradients (mean over ranks: run_plan scales by
    world / num_units) against the one-process reference."""
    import torch

    for c in range(num_plans):
        loss = sum(r[c][0] for r in results) / results[0][c][1]
        torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), **tol)
        for name, ref in ref_grads.items():
            total = sum(r[c][2][name] for r in results) / len(results)
            torch.testing.assert_close(total, ref, **tol, msg=lambda m: f"{name} plan {c}: {m}")


def per_context_reference(sequences, structures, family, model_kwargs, objective=None):
    """The semantics, slowly: position j's logits are the last logits of the model on ctx(j) (positions 0..); mean token loss over the batch and its gradients, one process.
    With a SequenceMatch `objective`: its per-position reference formula instead of token cross-entropy."""
    import torch

    from hetsp.backspace import reference_outputs
    from hetsp.objectives.lm import LanguageModeling

    # transformers' eager attention takes its softmax in fp32; sdpa stays in fp64 (the hybrid's eager is fp64)
    model = _model(family, model_kwargs, "eager" if family == "hybrid" else "sdpa")
    lm = LanguageModeling()
    units = lm.num_units([len(s) for s in sequences]) if objective is None else objective.num_units(sequences)
    total = 0.0
    for seq, s in zip(sequences, structures):
        rows = reference_outputs(lambda idx, seq=seq: model(input_ids=torch.tensor([[seq[i] for i in idx]]), use_cache=False).logits[0], s)
        if objective is None:
            loss = lm.loss_sum(torch.stack(rows), torch.tensor(lm.labels(seq))) / units
        else:
            from hetsp.objectives.sequencematch import reference_loss

            loss = reference_loss([torch.stack(rows)], [seq], objective) / units
        loss.backward()
        total += loss.item()
    return total, {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


# ---------------------------------------------------------------- block kernels with the lifetime mask

def lifetime_kernel_vs_reference(name, device, dtype, tol, seed=0, heads=(4, 2), dim=8):
    """Block kernel `name` against the reference kernel with a lifetime mask from random <bkspc>
    structures: a causal diagonal block (every token of each sequence) and an off-diagonal block
    (the second half of each sequence against its first half, where some rows see no key).
    Returns [(label, `tolerance_ratio` under tol=dict(atol, rtol))] over out, lse (finite rows),
    dq, dk, dv; at most 1 passes (rows that see no key have exactly zero dq: atol covers round-off)."""
    import random

    import torch

    from hetsp.attention.kernels import select_kernel
    from hetsp.attention.kernels.base import Lifetimes, Segments
    from hetsp.attention.kernels.reference import REFERENCE_KERNEL
    from hetsp.backspace import stack_structure
    from hetsp.testing import tolerance_ratio

    kern = select_kernel(name, device)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    structures = [stack_structure(ids, BK, 10, 1) for ids in (random_backspace_ids(rng, n, 1, p_pop=0.45) for n in (21, 6, 37))]
    structures.append(stack_structure(deep_pop_ids(40), BK, 10, 10))
    structures.append(stack_structure([1, 2, 3, 4, 5, BK, BK, BK, BK, BK, 6, 7], BK, 10, 0))  # pops back to an empty stack
    report = []
    for causal in (True, False):
        cu_q, cu_k, qt, kt, kp = [0], [0], [], [], []
        for s in structures:
            n = len(s)
            q_rows = range(n) if causal else range(n // 2, n)
            k_rows = range(n) if causal else range(n // 2)
            cu_q.append(cu_q[-1] + len(q_rows))
            cu_k.append(cu_k[-1] + len(k_rows))
            qt += list(q_rows)
            kt += list(k_rows)
            kp += [s.pops[i] for i in k_rows]
        seg = Segments(tuple(cu_q), tuple(cu_k))
        life = Lifetimes(*(torch.tensor(x, dtype=torch.long, device=device) for x in (qt, kt, kp)))
        q = torch.randn(cu_q[-1], heads[0], dim, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(cu_k[-1], heads[1], dim, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(cu_k[-1], heads[1], dim, generator=g).to(device=device, dtype=dtype)
        do = torch.randn(cu_q[-1], heads[0], dim, generator=g).to(device=device, dtype=dtype)
        o_ref, l_ref = REFERENCE_KERNEL.forward(q, k, v, seg, causal, 0.3, visible=life)
        o, l = kern.forward(q, k, v, seg, causal, 0.3, visible=life)
        hidden = ~torch.isfinite(l_ref)
        assert bool((~torch.isfinite(l[hidden])).all()), f"{name}: a row that sees no key must get lse = -inf"
        if not causal:
            assert bool(hidden.any()), "the off-diagonal block should hide every key from some rows"
        # the ring's backward gets the final (finite) lse; give the fully hidden rows a finite one
        l_fin = torch.where(hidden, torch.zeros_like(l_ref), l_ref)
        g_ref = REFERENCE_KERNEL.backward(do, q, k, v, o_ref, l_fin, seg, causal, 0.3, visible=life)
        g_got = kern.backward(do, q, k, v, o_ref, l_fin, seg, causal, 0.3, visible=life)
        pairs = zip(("out", "lse", "dq", "dk", "dv"), (o, l[~hidden]) + tuple(g_got), (o_ref, l_ref[~hidden]) + tuple(g_ref))
        for label, a, b in pairs:
            report.append((f"{name} causal={causal} {label}", tolerance_ratio(a, b, **tol)))
    return report


def triton_lifetime_checks():
    """Under TRITON_INTERPRET=1: the Triton kernel with the lifetime mask against the reference kernel."""
    import os

    import torch

    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"
    # fp32 on O(1) randn inputs: unit round-off 6e-8 over at most 40 keys
    bad = [(lab, e) for lab, e in lifetime_kernel_vs_reference("triton", "cpu", torch.float32, dict(atol=1e-5, rtol=1e-5)) if not e <= 1]
    assert not bad, bad
    return "ok"
