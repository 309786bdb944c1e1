"""The per-rank training program: ``python -m hetsp.train CONFIG [--set k=v] [--resume] [--dry-run]``.

Started by `hetsp-launch` (simulated ranks or torchrun). Reads the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT,
TORCHELASTIC_RESTART_COUNT) and HETSP_DEVICE / HETSP_DIST_BACKEND, set by
the launcher. One step: rank 0 plans the batch (in the background, one step
ahead) and broadcasts the plan; every rank derives the same batch from
(seed, step), executes the plan, and DeepSpeed updates the parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetsp.config import Config, ConfigError, config_to_toml, load_config

log = logging.getLogger("hetsp.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hetsp.train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="TOML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run folder")
    p.add_argument("--dry-run", action="store_true", help="print model size, memory and first plans; no training")
    p.add_argument("--profile", metavar="OUT.json", help="measure the planner's cost table on these ranks; no training")
    return p.parse_args(argv)


def setup_logging(rank: int) -> None:
    level = os.environ.get("HETSP_LOG_LEVEL", "INFO" if rank == 0 else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _device() -> Any:
    import torch

    name = os.environ.get("HETSP_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if dev.index is None:
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def run_dir_for(cfg: Config) -> Path:
    """The run folder: HETSP_RUN_DIR when the launcher sets it (--run-dir), else output_dir/name."""
    from hetsp.runlock import run_folder

    return run_folder(cfg.run.output_dir, cfg.run.name, os.environ.get("HETSP_RUN_DIR"))


@dataclass
class Runtime:
    """Everything a rank builds before its first step."""

    device: Any
    data: Any
    objective: Any
    flops: Any
    engine: Any


def build_runtime(cfg: Config) -> Runtime:
    """Data, model (ring attention, SSM sequence parallelism applied) and DeepSpeed engine on this rank."""
    import torch
    import torch.distributed as dist

    from hetsp.attention import register_attention, warm_up
    from hetsp.engine import build_engine
    from hetsp.metrics.flops import ModelFlops
    from hetsp.loading import build_training_model, num_parameters
    from hetsp.objectives import get_objective

    world_size = dist.get_world_size()
    device = _device()
    warm_up(device)  # NCCL: one collective before any group's first point-to-point exchange
    torch.manual_seed(cfg.run.seed)
    objective = get_objective(cfg.train.objective, cfg.objective)
    data = objective.build_data(cfg, cfg.run.seed)
    model = build_training_model(cfg, data, world_size, device, register_attention())
    num_params = num_parameters(model)
    if dist.get_rank() == 0:
        log.info("model: %s, %.2fM parameters, %d ranks on %s", cfg.model.family, num_params / 1e6, world_size, device)
    flops = ModelFlops.from_hf_config(model.config)  # a meta-device twin: ZeRO-3 may have partitioned the model
    engine = build_engine(model, cfg.train, world_size, device)
    return Runtime(device, data, objective, flops, engine)


def run_context(cfg: Config, rt: Runtime, run_dir: Path) -> Any:
    """The objective's `RunContext` on this rank, after `objective.prepare_run` (reference
    log-probs, frozen copies: taken from the model as it is now, the starting policy)."""
    import torch.distributed as dist

    from hetsp.attention.kernels import kernel_for_config
    from hetsp.objectives.base import RunContext
    from hetsp.planning import Planning

    rank, world_size = dist.get_rank(), dist.get_world_size()
    ctx = RunContext(rt.engine, rt.data, Planning(cfg, rt.data, world_size, rank), run_dir, rank, world_size,
                     rt.device, kernel_for_config(cfg.attention, rt.device),
                     lambda msg: log.info("%s", msg) if rank == 0 else None)
    rt.objective.prepare_run(ctx)
    return ctx


def profile(cfg: Config, out: Path) -> None:
    """Measure the planner's cost table on this machine and write it as a `profile` cost model file."""
    import torch.distributed as dist

    from hetsp.metrics.device import device_name
    from hetsp.profiler import measure, train_first_steps, warmup_steps
    from solver.costs.profile import hardware_here, save_profile

    from hetsp.loading import resolve_config

    cfg = resolve_config(cfg)
    rt = build_runtime(cfg)
    world = dist.get_world_size()
    degrees = cfg.planner.allowed_group_sizes or list(range(1, world + 1))
    run_dir = run_dir_for(cfg)
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)  # a precomputed CoPG reference is cached there, as in training
    dist.barrier()
    # the model as training runs it: after the job's first updates (hetsp.profiler), with the
    # objective's hooks (reference log-probs, online samples, noise drawn from the model). Plans
    # made there (CoPG's) must not need a cost table, which may be the very file being written: one
    # group of every rank, as `train_first_steps` plans the steps (a plan changes speed, never math).
    planner = dataclasses.replace(cfg.planner, name="static", group_size=world, allowed_group_sizes=[], cost_model="ring",
                                  profile_path="")
    ctx = run_context(dataclasses.replace(cfg, planner=planner), rt, run_dir)
    try:
        trained = train_first_steps(ctx, rt.objective, cfg.cluster.tokens_per_rank, warmup_steps(cfg.train.steps))
    finally:
        ctx.planning.close()
    points, fixed_s, overhead, step_s = measure(rt.engine, rt.objective, rt.data.vocab_size, rt.device, cfg.attention.kernel,
                                        degrees, cfg.data.max_seq_len, cfg.cluster.tokens_per_rank, data=rt.data)
    if dist.get_rank() == 0:
        hardware = hardware_here(device_name(rt.device) or "cpu")
        where = f"{hardware['cpu']} ({hardware['cores']} cores), {world} ranks, {cfg.model.family} model"
        save_profile(out, points, cfg.cluster.tokens_per_rank, fixed_s, device=where, group_overhead_s=overhead,
                     max_seq_len=cfg.data.max_seq_len, hardware=hardware, step_s=step_s, world=world,
                     trained_steps=trained)
        log.info("profile with %d points (fixed %.1f ms per step, %.1f ms per micro-batch; per group %s ms) written to %s",
                 len(points), step_s * 1e3, fixed_s * 1e3, ", ".join(f"{d}: {t * 1e3:.0f}" for d, t in overhead.items()), out)


def train(cfg: Config, resume: bool) -> dict[str, int]:
    """Train from step 0 or the newest checkpoint; return the steps this run covered."""
    import torch
    import torch.distributed as dist

    from hetsp import checkpoint
    from hetsp.engine import resolve_dtype
    from hetsp.executor import run_plan
    from hetsp.metrics import MetricsLogger
    from hetsp.metrics.device import peak_memory_bytes
    from hetsp.metrics.flops import peak_flops
    from hetsp.preempt import StopRequest

    from hetsp.loading import resolve_config

    cfg = resolve_config(cfg)  # the checkpoint's model fields and tokenizer (model.init_from)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    run_dir = run_dir_for(cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config_to_toml(cfg))
    rt = build_runtime(cfg)
    device, data, objective, flops, engine = rt.device, rt.data, rt.objective, rt.flops, rt.engine
    dtype_name = "bf16" if resolve_dtype(cfg.train, device) == torch.bfloat16 else "fp32"
    # MFU uses the device's published peak only (cluster.peak_tflops is the planner's cost-model input).
    peak = peak_flops(device, dtype_name)

    ctx = run_context(cfg, rt, run_dir)  # before any checkpoint is loaded: the model is the starting policy
    planning, kernel = ctx.planning, ctx.kernel
    start = 0
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if resume or cfg.run.resume or restarted:
        start = checkpoint.resume(engine, run_dir, rank == 0, log)

    metrics = MetricsLogger(run_dir, rank == 0, cfg.train.steps, start_step=start, world_size=world_size,
                            peak_flops_per_rank=peak, print_every=cfg.train.log_every, report_to=cfg.run.report_to)
    ckpt_meta = {"vocab_size": engine.module.config.vocab_size if cfg.model.init_from else data.vocab_size,
                 "world_size": world_size, "family": cfg.model.family}
    val = data.val_batches(cfg.train.eval_batches) if cfg.train.eval_every > 0 else []
    stop = StopRequest().__enter__()  # SIGTERM from here on: checkpoint at the end of the step
    end = cfg.train.steps if cfg.train.stop_after <= 0 else min(cfg.train.steps, start + cfg.train.stop_after)
    skipped = []  # steps whose every sequence was too long to place (planner.long_policy = "drop")

    def end_of_step(done: int) -> bool:
        """Checkpoint when due or when any rank received SIGTERM; True: stop here."""
        every = cfg.train.checkpoint_every
        stopping_early = done == end < cfg.train.steps
        preempted = stop.agreed(device)
        if preempted or stopping_early or (every > 0 and (done % every == 0 or done == end)):
            checkpoint.save(engine, run_dir, done, ckpt_meta, cfg.train.keep_checkpoints)
        if preempted and rank == 0:
            log.warning("SIGTERM: checkpoint of step %d written to %s; stopping (--resume continues)",
                        done, checkpoint.checkpoint_dir(run_dir))
        return preempted

    def heldout(updates: int) -> None:
        found = objective.heldout_metrics(ctx)  # e.g. CoPG's reward on held-out prompts
        if found:
            metrics.log_heldout(updates, found)

    try:
        if start == 0:
            heldout(0)
        for step in range(start, end):
            t0 = time.perf_counter()
            objective.set_step(step)
            made = objective.train_batch(ctx, step)  # online sampling; None: the data module's batch
            batch = data.train_batch(step) if made is None else made
            t_data = time.perf_counter() - t0
            if made is None:
                plan = planning.plan_for(step)
            else:
                plan = planning.plan_for(step, sequences=batch, bundles=objective.bundles(batch))
            batch = planning.kept(plan, batch)
            if step + 1 < end and not objective.makes_batch(step + 1):
                planning.prefetch(step + 1)
            t_plan = time.perf_counter() - t0 - t_data
            metrics.log_plan(step, plan)
            if not plan.lengths:
                skipped.append(step)
                if rank == 0:
                    log.warning("step %d skipped: all %d sequences are too long to place (%d steps skipped so far)",
                                step, len(plan.dropped), len(skipped))
                if end_of_step(step + 1):
                    end = step + 1
                    break
                continue
            batch = objective.step_batch(ctx, plan, batch)
            res = run_plan(engine, plan, batch, rank, world_size, device, objective, kernel,
                           structures=objective.structures(batch))
            engine.step()
            # one reduction: the loss sum, and each rank's data and exchange seconds (logged as the mean over ranks)
            sums = torch.tensor([res.loss_sum, t_data + res.data_s, res.comm_s], dtype=torch.float64)
            dist.all_reduce(sums)
            loss_total, data_s, comm_s = sums.tolist()
            dt = time.perf_counter() - t0
            record = {
                "loss": loss_total / res.num_units,
                "data_s": data_s / world_size,
                "comm_s": comm_s / world_size,
                "lr": engine.get_lr()[0],
                "tokens": sum(plan.lengths),
                "step_time_s": dt,
                "plan_time_s": t_plan,
                "est_time_s": plan.meta.get("est_time_s"),  # the planner's prediction of this step's time
                "solve_s": plan.meta.get("solve_s"),
                "num_micro_batches": plan.num_micro_batches,
                "group_sizes": plan.group_sizes(),
                "epoch": data.epoch_of(step),
            }
            record.update(objective.finish_metrics(res.metrics))
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            record["model_flops"] = flops.for_lengths(plan.lengths)
            record["peak_mem_bytes"] = peak_memory_bytes(device)
            metrics.log_step(step, record)
            done = step + 1
            if val and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                metrics.log_eval(step, evaluate(engine, planning, val, rank, world_size, device, objective, kernel))
            if end_of_step(done):
                end = done
                break
        if end == cfg.train.steps:
            heldout(end)
    finally:
        stop.__exit__()
        planning.close()
        metrics.close()
    if skipped and rank == 0:
        log.warning("%d step(s) skipped because every sequence was too long to place: %s", len(skipped), skipped)
    return {"start": start, "end": end, "skipped": len(skipped)}


def evaluate(engine: Any, planning: Any, val: list, rank: int, world_size: int, device: Any, objective: Any, kernel: str) -> float:
    """Mean unit loss over the held-out batches (each executed under its own plan)."""
    import torch
    import torch.distributed as dist

    from hetsp.executor import run_plan

    engine.eval()
    loss, units = 0.0, 0
    for batch in val:
        plan = planning.plan_for(-1, sequences=batch, bundles=objective.bundles(batch))
        batch = planning.kept(plan, batch)
        res = run_plan(engine, plan, batch, rank, world_size, device, objective, kernel, train=False,
                       structures=objective.structures(batch))
        t = torch.tensor([res.loss_sum], dtype=torch.float64)
        dist.all_reduce(t)
        loss += t.item()
        units += res.num_units
    engine.train()
    return loss / max(1, units)


def init_distributed(timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    backend = os.environ.get("HETSP_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    setup_logging(rank)
    from hetsp import heartbeat
    from hetsp.checks import check_run

    heartbeat.start_from_env(rank)
    try:
        cfg = load_config(args.config, args.overrides)
        # what the launcher checked, before any collective
        check_run(cfg, int(os.environ.get("WORLD_SIZE", "1")), planning=not args.profile)
    except ValueError as e:
        print(f"{'config error' if isinstance(e, ConfigError) else 'error'}: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from hetsp.dry_run import dry_run

        try:
            from hetsp.loading import resolve_config

            return dry_run(resolve_config(cfg), int(os.environ.get("WORLD_SIZE", "1")))
        except (ValueError, NotImplementedError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
    import torch.distributed as dist

    from hetsp.checkpoint import CheckpointError
    from hetsp.planning import PeerFailed

    init_distributed(cfg.run.dist_timeout_s)
    try:
        if args.profile:
            profile(cfg, Path(args.profile))
        else:
            train(cfg, args.resume)
    except (ValueError, NotImplementedError, CheckpointError, PeerFailed, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 1 if isinstance(e, PeerFailed) else 2
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
