"""Run one step of the GPU check in this process: ``python -m bench.gpu.step NAME OUT.json [--quick]``.

The step writes its `results.StepResult` to OUT.json as it goes (`common.Recorder`), so the
check can stop it at its time box and still read what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

# name -> (module, function). The self-test steps exercise the runner in the dry mode.
STEPS = {
    "exactness": ("bench.gpu.exactness", "run"),
    "blocks": ("bench.gpu.throughput", "run_blocks"),
    "throughput": ("bench.gpu.throughput", "run_throughput"),
    "ssd": ("bench.gpu.throughput", "run_ssd"),
    "ring": ("bench.gpu.ring", "run"),
    "main_job": ("bench.gpu.main_job", "run"),
    "selftest_ok": ("bench.gpu.step", "selftest_ok"),
    "selftest_slow": ("bench.gpu.step", "selftest_slow"),
}


def selftest_ok(rec, quick: bool = False) -> None:
    """Records a row and finishes; with --quick off it also imports every step's module."""
    if not quick:
        for module, _ in STEPS.values():
            importlib.import_module(module)
    rec.row("self-test", value=1.5, text="a|b")
    rec.finish("ok", "self-test step ran")


def selftest_slow(rec, quick: bool = False) -> None:
    rec.row("self-test", stage="before the time box")
    time.sleep(600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.step")
    p.add_argument("name", choices=sorted(STEPS))
    p.add_argument("out", type=Path)
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    args = p.parse_args(argv)
    from .results import Recorder

    rec = Recorder(args.out, args.name)
    module, fn = STEPS[args.name]
    try:
        getattr(importlib.import_module(module), fn)(rec, quick=args.quick)
    except Exception as e:
        traceback.print_exc()
        rec.finish("fail", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
