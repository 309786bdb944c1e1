#!/usr/bin/env bash
# Download here (network needed) the wheels bench/gpu_check.sh installs on an offline GPU node
# into the git-ignored folder gpu_wheels/, and print their size with the tree's (64 MiB budget).
#   bench/gpu_wheels.sh [--dest gpu_wheels] [--no-download]
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
exec "${PYTHON:-python3}" -m bench.gpu.wheels "$@"
