#!/usr/bin/env bash
# Installs hetsp and everything it needs into the current Python environment.
# Without a GPU, the CPU build of torch 2.13.0 goes in first so that the
# project's torch range is already satisfied and no CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
  fi
fi
"$PY" -m pip install --quiet -e ".[test]"
