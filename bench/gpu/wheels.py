"""The wheels the GPU check needs on an offline GPU node, downloaded here beforehand.

The node to prepare for: x86-64, Python 3.12, torch 2.11 (CUDA 13), triton, transformers,
peft, pytest and hypothesis installed, no network. What else hetsp and the check import
travels with the working tree as wheels (`carry`), 64 MiB in all with the tree:

    python -m bench.gpu.wheels [--dest gpu_wheels] [--limit-mib 64]

Versions are pinned to the ones the CPU suite passes with here. Each wheel is downloaded with
``pip download --no-deps --only-binary=:all:`` for Python 3.12 manylinux x86-64, one name at
a time, so nothing the node already has (torch above all) is fetched. DeepSpeed publishes
only a source package: with DS_BUILD_OPS=0 its wheel is pure Python and is built here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = "gpu_wheels"
LIMIT_MIB = 64
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    why: str
    build: bool = False  # source only on the index: built here with `pip wheel`

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


WHEELS: tuple[Wheel, ...] = (
    Wheel("PuLP", "3.3.2", "MILP planner (bundles CBC, the fallback solver)"),
    Wheel("highspy", "1.16.0", "HiGHS, the MILP planner's default solver"),
    Wheel("deepspeed", "0.19.8", "ZeRO engine of the main job (pure-Python wheel, ops not prebuilt)", build=True),
    Wheel("hjson", "3.1.0", "deepspeed dependency"),
    Wheel("py-cpuinfo", "9.0.0", "deepspeed dependency"),
    Wheel("pydantic", "2.13.4", "deepspeed dependency"),
    Wheel("pydantic-core", "2.46.4", "pydantic dependency"),
    Wheel("annotated-types", "0.7.0", "pydantic dependency"),
    Wheel("typing-inspection", "0.4.2", "pydantic dependency"),
    Wheel("msgpack", "1.2.4", "deepspeed dependency"),
    Wheel("ninja", "1.13.2", "deepspeed dependency"),
    Wheel("einops", "0.8.2", "deepspeed and fla-core dependency"),
    Wheel("fla-core", "0.6.0", "flash-linear-attention's Triton kernels (chunked SSD comparison)"),
    Wheel("pytest-timeout", "2.4.0", "the test suite's per-test timeout"),
)

# Not carried, and what the check does instead.
NOT_CARRIED: tuple[tuple[str, str], ...] = (
    ("flash-attn", "no wheel on the package index (built against one torch/CUDA pair): the check skips the "
                   "flash_attn kernel unless the node has it, and compares torch's own flash op instead"),
    ("datasets", "needs pyarrow (55 MB wheel) and pandas (12 MB): over the 64 MiB budget; the main job reads "
                 "the same stdlib corpus without it (bench/gpu/main_job.py)"),
    ("matplotlib", "plots only; the check writes tables"),
)


def mib(num_bytes: int) -> float:
    return num_bytes / 2**20


def download_command(wheel: Wheel, dest: Path) -> list[str]:
    """pip download of one wheel for the node's Python and platform, without dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS + ("any",):
        cmd += ["--platform", platform]
    return cmd + [wheel.spec]


def build_command(wheel: Wheel, dest: Path) -> list[str]:
    """pip wheel of a source-only package (no dependencies, no compiled ops)."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), wheel.spec]


def _have(wheel: Wheel, dest: Path) -> Path | None:
    stem = wheel.name.replace("-", "_").lower() + "-" + wheel.version + "-"
    for p in dest.glob("*.whl"):
        if p.name.lower().startswith(stem):
            return p
    return None


def fetch(dest: Path, wheels: tuple[Wheel, ...] = WHEELS) -> list[str]:
    """Download (or build) every wheel missing from `dest`; return one line per problem."""
    dest.mkdir(parents=True, exist_ok=True)
    problems = []
    for w in wheels:
        if _have(w, dest):
            continue
        env = dict(os.environ, DS_BUILD_OPS="0") if w.build else None
        cmd = build_command(w, dest) if w.build else download_command(w, dest)
        print(f"{'building' if w.build else 'downloading'} {w.spec}", flush=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0 or not _have(w, dest):
            problems.append(f"{w.spec}: {'pip wheel' if w.build else 'pip download'} failed: "
                            f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return problems


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of the files git would carry (tracked and untracked, not ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                         capture_output=True, check=True).stdout
    total = 0
    for rel in out.decode().split("\0"):
        p = root / rel
        if rel and p.is_file():
            total += p.stat().st_size
    return total


def wheels_bytes(dest: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(dest.glob("*.whl"))}


def report(dest: Path, limit_mib: float, root: Path = ROOT) -> tuple[list[str], bool]:
    """Lines describing what is carried and whether wheels plus tree fit in `limit_mib`."""
    sizes = wheels_bytes(dest)
    tree = tree_bytes(root)
    total = tree + sum(sizes.values())
    lines = [f"  {mib(b):7.2f} MiB  {name}" for name, b in sizes.items()]
    lines.append(f"wheels: {len(sizes)} files, {mib(sum(sizes.values())):.2f} MiB; tree: {mib(tree):.2f} MiB; "
                 f"total {mib(total):.2f} MiB of {limit_mib:.0f} MiB")
    for name, why in NOT_CARRIED:
        lines.append(f"not carried: {name}: {why}")
    return lines, total <= limit_mib * 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_wheels.sh", description=__doc__.split("\n")[0])
    p.add_argument("--dest", default=DEFAULT_DEST, help=f"wheel folder, git-ignored (default {DEFAULT_DEST})")
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="budget for wheels plus tree")
    p.add_argument("--no-download", action="store_true", help="only report what the folder holds")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    if not dest.is_absolute():
        dest = ROOT / dest
    problems = [] if args.no_download else fetch(dest)
    lines, fits = report(dest, args.limit_mib)
    print("\n".join(lines))
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not fits:
        print(f"error: wheels and tree exceed {args.limit_mib:.0f} MiB; drop a wheel", file=sys.stderr)
    if problems or not fits:
        return 1
    print(f"carry {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} to the GPU node, "
          "then run bench/gpu_check.sh there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
