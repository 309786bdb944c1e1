"""The GPU check: one command that installs the carried wheels offline, then runs every GPU
path of hetsp in time-boxed steps, each printing one summary line, and writes the results
folder (results.json and results.md). ``bench/gpu_check.sh [--dry-run] [options]``.

Steps, in order, with their time boxes (seconds; the whole check stops within --budget-s):
install, tests (pytest -m gpu), exactness, blocks, throughput, ssd, ring, main_job. A step
that overruns its box is stopped (its process group killed) and keeps what it recorded.

--dry-run (no GPU needed) checks the check itself: argument handling, an offline install of
a wheel built on the spot into a temporary target folder (and, when the wheel folder exists,
that pip accepts every wheel for the node's Python 3.12 manylinux x86-64), the step runner
with a step that finishes and one stopped at its time box, and the result writer; exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .install import check_for_node, install, make_wheel
from .results import StepResult, read_results, write_results
from .wheels import DEFAULT_DEST, PLATFORMS, PYTHON_VERSION

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 480
# name -> time box in seconds (the sum, with the install, stays under BUDGET_S).
BOXES = {"tests": 50, "exactness": 75, "blocks": 50, "throughput": 60, "ssd": 40, "ring": 70, "main_job": 110}
IMPORTS = ("deepspeed", "pulp", "highspy", "fla", "flash_attn")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="check the check's own logic; no GPU needed")
    p.add_argument("--wheels", default=DEFAULT_DEST, help=f"folder of carried wheels (default {DEFAULT_DEST})")
    p.add_argument("--out", default="gpu_results", help="results folder (default gpu_results)")
    p.add_argument("--site", help="where the wheels are installed (default: OUT/site)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"the whole check's limit (default {BUDGET_S})")
    p.add_argument("--only", help=f"comma-separated steps to run, of {','.join(BOXES)}")
    p.add_argument("--quick", action="store_true", help="smaller sizes in every step")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s}: must be positive")
    if args.only:
        steps = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in steps if s not in BOXES]
        if unknown or not steps:
            p.error(f"--only {args.only!r}: unknown step(s) {unknown}; choose from {','.join(BOXES)}")
        args.steps = steps
    else:
        args.steps = list(BOXES)
    args.wheels = _abs(args.wheels)
    args.out = _abs(args.out)
    args.site = _abs(args.site) if args.site else args.out / "site"
    return args


def _abs(p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else ROOT / p


def step_env(site: Path | None) -> dict[str, str]:
    """The environment of every step: installed wheels and the repository on PYTHONPATH."""
    paths = ([str(site)] if site else []) + [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")


def run_boxed(name: str, cmd: list[str], box_s: float, env: dict[str, str], log_path: Path) -> tuple[int | None, float]:
    """Run `cmd` in its own process group, stopped after `box_s`; (return code or None if stopped, seconds)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=box_s)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the launcher of the main job then stops its ranks (own sessions)
            for sig, grace_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = None
    return rc, time.perf_counter() - t0


def run_step(name: str, box_s: float, out: Path, env: dict[str, str], quick: bool) -> StepResult:
    """One `bench.gpu.step` in a subprocess, stopped at its time box; its recorded result."""
    import json

    path = out / "steps" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.gpu.step", name, str(path)] + (["--quick"] if quick else [])
    rc, seconds = run_boxed(name, cmd, box_s, env, out / "logs" / f"{name}.log")
    if path.exists():
        res = StepResult.from_dict(json.loads(path.read_text()))
    else:
        res = StepResult(name, "fail", "the step wrote no result")
    res.seconds = seconds
    if rc is None:
        res.status = "timeout"
        res.summary = f"stopped at its {box_s:.0f}s time box; recorded so far: {len(sum(res.tables.values(), []))} rows"
    elif rc != 0 and res.status == "ok":
        res.status, res.summary = "fail", f"exited {rc} after reporting: {res.summary}"
    elif res.status == "timeout":  # exited without finishing its record
        res.status, res.summary = "fail", f"exited {rc} without a summary (log: {out / 'logs' / (name + '.log')})"
    return res


def run_tests(box_s: float, out: Path, env: dict[str, str]) -> StepResult:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "--continue-on-collection-errors", "-p", "no:cacheprovider"]
    log = out / "logs" / "tests.log"
    rc, seconds = run_boxed("tests", cmd, box_s, env, log)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    last = lines[-1].strip("= ") if lines else "no output"
    if rc is None:
        return StepResult("tests", "timeout", f"pytest -m gpu stopped at its {box_s:.0f}s time box", seconds)
    status = "ok" if rc == 0 else ("skip" if rc == 5 else "fail")
    return StepResult("tests", status, f"pytest -m gpu: {last}", seconds)


def install_step(args, env_python: str = sys.executable) -> StepResult:
    t0 = time.perf_counter()
    ok, line = install(args.wheels, args.site, env_python)
    if ok:
        probe = "import importlib.util as u; print(' '.join(m for m in %r if u.find_spec(m)))" % (IMPORTS,)
        found = subprocess.run([env_python, "-c", probe], env=step_env(args.site), capture_output=True, text=True).stdout.split()
        missing = [m for m in IMPORTS if m not in found]
        line += f"; importable: {', '.join(found) or 'none'}" + (f"; missing: {', '.join(missing)}" if missing else "")
    return StepResult("install", "ok" if ok else "fail", line, time.perf_counter() - t0)


def choices(steps: list[StepResult]) -> list[str]:
    """Which GPU path to use, from what the check measured (hetsp's own kernels unless a
    library kernel was within tolerance of fp64 and faster)."""
    by = {s.name: s for s in steps}
    lines = []
    exact = {}
    for row in by.get("exactness", StepResult("exactness", "skip", "")).tables.get("kernels vs fp64", []):
        kernel = row["case"].split()[0]
        exact[kernel] = exact.get(kernel, True) and bool(row.get("ok"))
    speed: dict[str, dict[int, float]] = {}
    for row in by.get("throughput", StepResult("throughput", "skip", "")).tables.get("attention fwd+bwd, causal, bf16", []):
        if "tflops" in row:
            speed.setdefault(row["kernel"], {})[row["tokens"]] = row["tflops"]
    base = speed.get("triton", {})
    gains = {}  # kernel -> mean speed ratio to Triton over the lengths both ran
    for k, by_len in speed.items():
        common = [n for n in by_len if n in base]
        if k != "triton" and exact.get(k) and common:
            gains[k] = sum(by_len[n] / base[n] for n in common) / len(common)
    if base and exact.get("triton") is not None:
        best = max(gains, key=gains.get, default=None)
        if best is not None and gains[best] > 1:
            lines.append(f"attention: {best} is exact and {gains[best]:.2f}x the Triton kernel's TFLOP/s: "
                         f"--set attention.kernel=\"{best}\"")
        else:
            lines.append("attention: keep the Triton kernel (no exact library kernel was faster)")
    else:
        lines.append("attention: not decided (exactness or throughput missing); the default stays")
    ssd = by.get("ssd")
    if ssd is not None and "ssd_choice" in ssd.data:
        lines.append(f"SSD scan: {ssd.data['ssd_choice']} ({ssd.data.get('ssd_reason', '')}): "
                     f"--set model.extra.ssd_kernel=\"{ssd.data['ssd_choice']}\"")
    else:
        lines.append("SSD scan: not decided (the ssd step did not finish); hetsp's own scan stays")
    return lines


def dry_run(args) -> int:
    """Check the check's own logic without a GPU; exit 0 when every part works."""
    t0 = time.perf_counter()
    problems = []
    with tempfile.TemporaryDirectory(prefix="hetsp_gpu_dry_") as tmp:
        tmp = Path(tmp)
        wheel = make_wheel(tmp / "wheels")
        ok, line = install(wheel.parent, tmp / "site")
        probe = subprocess.run([sys.executable, "-c", "import hetsp_gpu_check_probe as m; print(m.VALUE)"],
                               env=step_env(tmp / "site"), capture_output=True, text=True)
        if not ok or probe.stdout.strip() != "42":
            problems.append(f"offline install: {line}; probe import printed {probe.stdout.strip()!r} {probe.stderr.strip()[-200:]}")
        print(f"dry-run: offline install of a built wheel into a target folder: {'ok' if not problems else 'FAILED'}")
        if args.wheels.is_dir() and any(args.wheels.glob("*.whl")):
            ok, line = check_for_node(args.wheels, PYTHON_VERSION, PLATFORMS)
            print(f"dry-run: {line}")
            shutil.rmtree(args.wheels / ".dry-run-target", ignore_errors=True)
            if not ok:
                problems.append(line)
        else:
            print(f"dry-run: no wheel folder at {args.wheels} (bench/gpu_wheels.sh makes it); not checked")
        env = step_env(tmp / "site")
        steps = [run_step("selftest_ok", 120, tmp / "out", env, quick=False),
                 run_step("selftest_slow", 5, tmp / "out", env, quick=True)]
        if steps[0].status != "ok" or steps[0].tables.get("self-test", [{}])[0].get("value") != 1.5:
            problems.append(f"step runner: a finishing step gave {steps[0].line()}")
        if steps[1].status != "timeout" or not steps[1].tables.get("self-test"):
            problems.append(f"step runner: a step over its time box gave {steps[1].line()}")
        meta = {"device": "dry run (no GPU)", "budget_s": args.budget_s, "steps": ",".join(args.steps)}
        write_results(tmp / "out", steps, meta)
        meta2, back = read_results(tmp / "out")
        md = (tmp / "out" / "results.md").read_text()
        if [s.name for s in back] != [s.name for s in steps] or meta2 != meta or "a\\|b" not in md:
            problems.append("result writer: results.json / results.md did not round-trip")
        for s in steps:
            print(f"dry-run: {s.line()}")
    for line in problems:
        print(f"dry-run problem: {line}", file=sys.stderr)
    print(f"dry-run: {'ok' if not problems else 'FAILED'} in {time.perf_counter() - t0:.1f}s")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    import torch

    if not torch.cuda.is_available():
        print("error: torch sees no CUDA device; run bench/gpu_check.sh --dry-run to check the check itself", file=sys.stderr)
        return 2
    from hetsp.metrics.flops import peak_flops

    deadline = time.monotonic() + args.budget_s
    device = torch.cuda.get_device_name(0)
    peak = peak_flops("cuda:0", "bf16")
    meta = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "bf16_peak_tflops": peak / 1e12 if peak else None, "budget_s": args.budget_s, "quick": args.quick,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [install_step(args)]
    print(steps[-1].line(), flush=True)
    env = step_env(args.site)
    for name in args.steps:
        left = deadline - time.monotonic() - 5
        if left < 10:
            steps.append(StepResult(name, "skip", f"no time left in the {args.budget_s:.0f}s budget"))
        elif name == "tests":
            steps.append(run_tests(min(BOXES[name], left), args.out, env))
        else:
            steps.append(run_step(name, min(BOXES[name], left), args.out, env, args.quick))
        print(steps[-1].line(), flush=True)
    meta["choices"] = choices(steps)
    for line in meta["choices"]:
        print(f"choice: {line}")
    js, md = write_results(args.out, steps, meta)
    print(f"results: {js} and {md}")
    return 0 if all(s.status in ("ok", "skip") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
