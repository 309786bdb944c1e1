#!/usr/bin/env bash
# Verify and measure every GPU path of hetsp in under 8 minutes, offline, from the repository
# root of a copy that carries gpu_wheels/ (made by bench/gpu_wheels.sh). Results: gpu_results/.
#   bench/gpu_check.sh [--dry-run] [--only exactness,ring] [--quick] [--out DIR] [--wheels DIR]
# --dry-run checks the check's own logic on a machine without a GPU and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_NO_INDEX=1
exec "${PYTHON:-python3}" -m bench.gpu.check "$@"
