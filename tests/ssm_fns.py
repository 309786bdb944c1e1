"""Rank functions for the sequence-parallel SSM tests (sent to a RankPool).

Every rank draws the same whole packed batch from the case's seed, computes
the single-process reference, runs its own shard (zigzag layout of
`hetsp.layout`) and asserts on its outputs and input gradients. Parameter
gradients are partial sums per rank: they are returned, and the test process
adds them over each group and compares with the reference.

Shapes: T tokens of the packed batch, C channels, K conv width, H heads,
P head dim, G B/C groups, N state size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hetsp.layout import shard_layout
from hetsp.ssm_parallel import GroupSpec, causal_conv1d_sp, local_segments, pass_states, ssd_scan_sp

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def my_group(groups):
    """(start, size) of the group this rank is in, among `groups`."""
    r = dist.get_rank()
    for start, size in groups:
        if start <= r < start + size:
            return start, size
    raise AssertionError(f"rank {r} is in none of {groups}")


def _docs(lengths):
    out, off = [], 0
    for n in lengths:
        out.append(slice(off, off + n))
        off += n
    return out


def _close(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"rank {dist.get_rank()}, {what}: {m}")


# ---------------------------------------------------------------- references


def conv_ref(x_TC, w_CK, b_C, lengths):
    """Causal depthwise conv of each document alone: [T, C]."""
    k = w_CK.shape[1]
    return torch.cat(
        [F.conv1d(F.pad(x_TC[s].t()[None], (k - 1, 0)), w_CK[:, None], b_C, groups=w_CK.shape[0])[0].t() for s in _docs(lengths)]
    )


def ssd_seq(x_LHP, dt_LH, A_H, B_LGN, C_LGN, D_H=None):
    """Sequential SSD recurrence from a zero state: (y [L, H, P], end state [H, P, N])."""
    num_heads, rep = x_LHP.shape[1], x_LHP.shape[1] // B_LGN.shape[1]
    B = B_LGN.repeat_interleave(rep, 1)
    C = C_LGN.repeat_interleave(rep, 1)
    h = x_LHP.new_zeros((num_heads, x_LHP.shape[2], B.shape[2]))
    ys = []
    for t in range(x_LHP.shape[0]):
        h = torch.exp(dt_LH[t] * A_H)[:, None, None] * h + (dt_LH[t][:, None, None] * x_LHP[t][:, :, None]) * B[t][:, None, :]
        y = torch.einsum("hpn,hn->hp", h, C[t])
        if D_H is not None:
            y = y + D_H[:, None] * x_LHP[t]
        ys.append(y)
    y = torch.stack(ys) if ys else x_LHP.new_zeros(x_LHP.shape)
    return y, h


def diag_seq(x_LC, a_CN, b_CN, c_CN):
    """Time-invariant complex diagonal recurrence (S4D-like) from zero: (y [L, C], end state [C, N])."""
    h = torch.zeros_like(a_CN)
    ys = []
    for t in range(x_LC.shape[0]):
        h = a_CN * h + b_CN * x_LC[t][:, None]
        ys.append((h * c_CN).sum(-1).real)
    y = torch.stack(ys) if ys else x_LC.new_zeros(x_LC.shape)
    return y, h


def diag_scan_sp(x_TC, a_CN, b_CN, c_CN, segments, group):
    """`diag_seq` over a rank's segments with `pass_states` (complex states): [T, C]."""
    ys, ends, decays = [], [], []
    for off, n in zip(segments.offset, segments.length):
        y, end = diag_seq(x_TC[off : off + n], a_CN, b_CN, c_CN)
        ys.append(y)
        ends.append(end)
        decays.append(a_CN**n)
    s_in = pass_states(torch.stack(decays), torch.stack(ends), segments, group)
    out = []
    for k, n in enumerate(segments.length):
        powers = a_CN[None] ** torch.arange(1, n + 1, dtype=x_TC.dtype)[:, None, None]  # [L, C, N]
        out.append(ys[k] + (powers * s_in[k] * c_CN).sum(-1).real)
    return torch.cat(out)


# ---------------------------------------------------------------- op cases


def _draw_op_inputs(op, lengths, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if op == "conv":
        return dict(x=r(T, 5), w=r(5, 4, scale=0.5), b=r(5))
    if op in ("ssd", "ssd_bamba"):
        H, P, G, N = 4, 3, 2, 5
        return dict(
            x=r(T, H, P), dt=torch.rand(T, H, generator=g, dtype=torch.float64).to(dtype) * 0.5 + 0.05,
            A=-torch.rand(H, generator=g, dtype=torch.float64).to(dtype) - 0.2, B=r(T, G, N), C=r(T, G, N), D=r(H),
        )
    if op == "diag":
        C, N = 3, 4
        lam = torch.complex(-torch.rand(C, N, generator=g, dtype=torch.float64) - 0.1, torch.randn(C, N, generator=g, dtype=torch.float64))
        cdt = torch.complex64 if dtype == torch.float32 else torch.complex128
        return dict(
            x=r(T, C), a=torch.exp(0.3 * lam).to(cdt),
            b=torch.complex(r(C, N), r(C, N)).to(cdt), c=torch.complex(r(C, N), r(C, N)).to(cdt),
        )
    if op == "hy_s4d":
        H, N = 3, 4
        lam = torch.complex(-torch.rand(H, N, generator=g, dtype=torch.float64) - 0.1, torch.randn(H, N, generator=g, dtype=torch.float64))
        a_bar = torch.exp(0.3 * lam)
        return dict(u=r(T, H), a_bar=a_bar, b_bar=(a_bar - 1) / lam, c_modes=torch.complex(r(H, N), r(H, N)))
    if op == "hy_ema":
        H, N = 3, 4
        return dict(x=r(T, H), damp=torch.rand(H, N, generator=g, dtype=torch.float64) * 0.8 + 0.1, pb=r(H, N), gamma=r(H, N))
    if op == "hy_ssd":
        H, P, G, N = 4, 3, 2, 5
        return dict(
            x=r(T, H, P), dt=torch.rand(T, H, generator=g, dtype=torch.float64) * 0.5 + 0.05,
            A=-torch.rand(H, generator=g, dtype=torch.float64) - 0.2, B=r(T, G, N), C=r(T, G, N),
        )
    if op == "hy_conv":
        return dict(x=r(T, 5), w=r(5, 4, scale=0.5), b=r(5))
    if op == "hy_attn":
        return dict(q=r(T, 4), k=r(T, 4), v=r(T, 3), active=torch.rand(T, generator=g) < 0.6)
    raise ValueError(op)


def _bamba_local(A, D, chunk_size):
    from transformers.models.bamba import modeling_bamba as mb

    original = getattr(mb, "_hetsp_sp_originals", None) or {}
    scan = original.get("mamba2_chunk_scan", mb.mamba2_chunk_scan)

    def local(x, dt, b, c):
        y, end = scan(x[None], dt[None], A, b[None], c[None], chunk_size, D=D, return_final_states=True)
        return y[0], end[0]

    return local


def _run_op(op, inp, lengths, segments, group):
    """Output of op `op` on `inp`: the single-process reference when segments is None."""
    if op.startswith("hy_"):
        return _run_hybrid_kernel(op, inp, lengths, segments, group)
    if op == "conv":
        if segments is None:
            return conv_ref(inp["x"], inp["w"], inp["b"], lengths)
        return causal_conv1d_sp(inp["x"], inp["w"], inp["b"], segments, group)
    if op in ("ssd", "ssd_bamba"):
        if segments is None:
            return torch.cat([ssd_seq(inp["x"][s], inp["dt"][s], inp["A"], inp["B"][s], inp["C"][s], inp["D"])[0] for s in _docs(lengths)])
        if op == "ssd":
            local = lambda x, dt, b, c: ssd_seq(x, dt, inp["A"], b, c, inp["D"])  # noqa: E731
        else:
            local = _bamba_local(inp["A"], inp["D"], chunk_size=4)
        return ssd_scan_sp(local, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], segments, group)
    if op == "diag":
        if segments is None:
            return torch.cat([diag_seq(inp["x"][s], inp["a"], inp["b"], inp["c"])[0] for s in _docs(lengths)])
        return diag_scan_sp(inp["x"], inp["a"], inp["b"], inp["c"], segments, group)
    raise ValueError(op)


TOKEN_INPUTS = {"x", "dt", "B", "C", "u", "q", "k", "v"}
HY_KERNEL = {"hy_s4d": "s4d_scan", "hy_ema": "ema_scan", "hy_ssd": "ssd_scan", "hy_conv": "causal_conv1d", "hy_attn": "local_attention"}
HY_WINDOW = 3


def _cu(lengths):
    return torch.tensor([0] + [s.stop for s in _docs(lengths)], dtype=torch.int32)


def _run_hybrid_kernel(op, inp, lengths, segments, group):
    """A `models.kernels` kernel on the whole batch (segments None) or its group version on a shard."""
    import types

    from hetsp.ssm_parallel import hybrid
    from models.kernels import KERNELS

    name = HY_KERNEL[op]
    if segments is None:
        fn, cu = KERNELS[name], _cu(lengths)
        seg_of_token = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    else:
        holder = types.SimpleNamespace()
        hybrid.activate(holder, segments, group)
        fn = hybrid.group_kernel(name, KERNELS[name], holder)
        cu = torch.tensor(segments.cu_seqlens(), dtype=torch.int32)
        seg_of_token = torch.repeat_interleave(torch.arange(segments.num_segments), torch.tensor(segments.length))
    if op == "hy_s4d":
        return fn(inp["u"][None], inp["a_bar"], inp["b_bar"], inp["c_modes"], cu_seqlens=cu)[0][0]
    if op == "hy_ema":
        return fn(inp["x"][None], inp["damp"], inp["pb"], inp["gamma"], cu_seqlens=cu)[0][0]
    if op == "hy_ssd":
        return fn(inp["x"][None], inp["dt"][None], inp["A"], inp["B"][None], inp["C"][None], 4, cu_seqlens=cu)[0][0]
    if op == "hy_conv":
        return fn(inp["x"][None], inp["w"], inp["b"], cu_seqlens=cu)[0]
    # hy_attn: the activated tokens, packed in order; the others get 0
    act = inp["active"].nonzero()[:, 0]
    o = fn(inp["q"][act][None], inp["k"][act][None], inp["v"][act][None], seg_of_token[act][None], HY_WINDOW, 0.5)[0]
    return inp["v"].new_zeros(inp["v"].shape).index_put((act,), o)


def op_cases(cases):
    """Run each case ``(op, groups, lengths_per_group, dtype, seed)``; return per case the local parameter grads.

    Asserts on this rank's outputs and token-input gradients; parameter grads
    (inputs without a token axis) come back for the test to sum over each group.
    """
    results = []
    for op, groups, lengths_per_group, dtype, seed in cases:
        start, size = my_group(groups)
        gi = [g[0] for g in groups].index(start)
        lengths = lengths_per_group[gi]
        rank = dist.get_rank() - start
        inp = _draw_op_inputs(op, lengths, dtype, seed + gi)
        weight = torch.randn(sum(lengths), *_run_op(op, inp, lengths, None, None).shape[1:],
                             generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64).to(dtype)
        ref_in = {k: v.clone().requires_grad_(v.is_floating_point() or v.is_complex()) for k, v in inp.items()}
        ref_out = _run_op(op, ref_in, lengths, None, None)
        diff = [k for k, v in ref_in.items() if v.requires_grad]
        ref_grads = dict(zip(diff, torch.autograd.grad((ref_out * weight).sum(), [ref_in[k] for k in diff])))

        lay = shard_layout(lengths, size, rank)
        idx = torch.tensor(lay.token_index, dtype=torch.long)
        sp_in = {k: (v[idx] if k in TOKEN_INPUTS or k == "active" else v).clone() for k, v in inp.items()}
        sp_in = {k: v.requires_grad_(k in diff) for k, v in sp_in.items()}
        segments = local_segments(tuple(lengths), size, rank)
        out = _run_op(op, sp_in, lengths, segments, GroupSpec(start, size, rank))
        what = f"{op} {dtype} groups {groups} lengths {lengths}"
        _close(out.to(dtype), ref_out.detach()[idx].to(dtype), dtype, what + ": output")
        grads = dict(zip(diff, torch.autograd.grad((out * weight[idx]).sum(), [sp_in[k] for k in diff], materialize_grads=True)))
        params = {}
        for k, gr in grads.items():
            if k in TOKEN_INPUTS:
                _close(gr, ref_grads[k][idx], dtype, f"{what}: grad {k}")
            else:
                params[k] = (gr, ref_grads[k])
        results.append((start, params))
    return results


# ---------------------------------------------------------------- model cases


def check_model_results(results, cases, tol):
    """Loss and every parameter gradient, summed over each group, equal the reference."""
    for c, case in enumerate(cases):
        by_group = {}
        for res in results:
            start, loss, ref_loss, grads, ref_grads = res[c]
            by_group.setdefault(start, []).append((loss, ref_loss, grads, ref_grads))
        for start, members in by_group.items():
            what = f"{case[0]} groups {case[2]} group {start}"
            ref_loss, ref_grads = members[0][1], members[0][3]
            torch.testing.assert_close(sum(m[0] for m in members), ref_loss, rtol=tol["rtol"], atol=tol["atol"], msg=lambda m: f"{what} loss: {m}")
            assert set(ref_grads) == set(members[0][2]), f"{what}: parameters without gradient differ"
            for name, ref in ref_grads.items():
                total = sum(m[2][name] for m in members)
                torch.testing.assert_close(total, ref, **tol, msg=lambda m: f"{what} grad {name}: {m}")


def _lm_batch(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    labels = torch.full_like(ids, -100)
    for s in _docs(lengths):
        labels[s.start : s.stop - 1] = ids[s.start + 1 : s.stop]  # shifted on the whole sequence
    return ids, labels


VOCAB = 61


def _build(family, model_kwargs, attn, seed):
    from hetsp.config import ModelConfig
    from hetsp.model_registry import build_model

    torch.manual_seed(seed)
    return build_model(ModelConfig(family=family, **model_kwargs), VOCAB, attn_implementation=attn)


def model_cases(cases):
    """Run ``(family, model_kwargs, groups, lengths_per_group, seed, reference, dtype)`` cases.

    Reference, the same model in one process: "separate" each document alone
    (stock code, eager attention); "cu_seqlens" the whole packed batch through
    the model's own packed path; "shard" the whole packed batch as a group of one. Returns per case (group start, local loss sum,
    reference loss, local grads, reference grads) with grads as name -> tensor.
    """
    from hetsp.attention import make_shard_context, register_attention
    from hetsp.ssm_parallel import parallelize

    out = []
    for family, model_kwargs, groups, lengths_per_group, seed, reference, dtype in cases:
        start, size = my_group(groups)
        gi = [g[0] for g in groups].index(start)
        lengths = lengths_per_group[gi]
        ids, labels = _lm_batch(lengths, VOCAB, seed + gi)

        ref = _build(family, model_kwargs, register_attention() if reference == "shard" else "eager", seed).to(dtype)
        ref.eval()
        if reference == "separate":  # the stock model on each document alone
            ref_loss = sum(
                F.cross_entropy(ref(input_ids=ids[s][None], use_cache=False).logits[0].float(), labels[s], reduction="sum", ignore_index=-100)
                for s in _docs(lengths)
            )
        elif reference == "cu_seqlens":  # the model's own packed path
            cu = torch.tensor([0] + [s.stop for s in _docs(lengths)], dtype=torch.int32)
            logits = ref(input_ids=ids[None], cu_seqlens=cu, use_cache=False).logits[0]
            ref_loss = F.cross_entropy(logits.to(dtype), labels, reduction="sum", ignore_index=-100)
        else:  # "shard": the hetsp path with a group of one
            ref = parallelize(ref)
            ctx1 = make_shard_context(lengths, dist.get_rank(), 1, dist.get_rank(), "cpu")
            logits = ref(input_ids=ids[None], position_ids=ctx1.positions[None], hetsp_shard=ctx1).logits[0]
            ref_loss = F.cross_entropy(logits.to(dtype), labels, reduction="sum", ignore_index=-100)
        ref_loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}

        model = parallelize(_build(family, model_kwargs, register_attention(), seed).to(dtype))
        model.train()
        # SSM-only models run on ranks without tokens; attention cases avoid them (test_ssm_parallel)
        ctx = make_shard_context(lengths, start, size, dist.get_rank(), "cpu", allow_empty_ranks=True)
        idx = torch.tensor(ctx.layout.token_index, dtype=torch.long)
        logits = model(input_ids=ids[idx][None], position_ids=ctx.positions[None], hetsp_shard=ctx, use_cache=False).logits[0]
        loss = F.cross_entropy(logits.to(dtype), labels[idx], reduction="sum", ignore_index=-100)
        loss.backward()
        grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
        out.append((start, float(loss.detach()), float(ref_loss.detach()), grads, ref_grads))
    return out


# ---------------------------------------------------------------- whole plans through the executor


def plan_steps(cases, model_kwargs, dtype):
    """For each (sequences, plan_json): (global loss sum, local grads) through `run_plan` with SP layers."""
    from hetsp.attention import register_attention
    from hetsp.executor import PlainEngine, run_plan
    from hetsp.objectives.lm import LanguageModeling
    from hetsp.plan import Plan
    from hetsp.ssm_parallel import parallelize

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for sequences, plan_json in cases:
        model = parallelize(_build("hybrid", model_kwargs, register_attention(), 1234).to(dtype))
        plan = Plan.from_json(plan_json).validate(world)
        res = run_plan(PlainEngine(model), plan, sequences, rank, world, torch.device("cpu"), LanguageModeling(), "reference")
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
        out.append((res.loss_sum, res.num_units, grads))
    return out


def plan_reference(sequences, model_kwargs, dtype):
    """Mean token loss and its gradients for the whole batch in one process, one sequence at a time."""
    from hetsp.objectives.lm import LanguageModeling

    model = _build("hybrid", model_kwargs, "eager", 1234).to(dtype)
    lm = LanguageModeling()
    units = lm.num_units([len(s) for s in sequences])
    total = 0.0
    for seq in sequences:
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
        loss = lm.loss_sum(logits, torch.tensor(lm.labels(seq))) / units
        loss.backward()
        total += loss.item()
    return total, {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def replaced_kernel_error(model_kwargs):
    """The message a sharded forward raises when set_kernels ran after parallelize."""
    from hetsp.attention import make_shard_context, register_attention
    from hetsp.ssm_parallel import parallelize
    from models.kernels import REFERENCE_KERNELS

    model = parallelize(_build("hybrid", model_kwargs, register_attention(), 0))
    model.set_kernels(ssd_scan=REFERENCE_KERNELS["ssd_scan"])
    ctx = make_shard_context([8], 0, dist.get_world_size(), dist.get_rank(), "cpu")
    try:
        model(input_ids=torch.zeros((1, ctx.num_tokens), dtype=torch.long), position_ids=ctx.positions[None], hetsp_shard=ctx)
    except ValueError as err:
        return str(err)
    return "no error"
