#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the pure-Python wheels the GPU machine lacks into
# .whl/ (git-ignored), for gpu_check.sh to install there: trl and what it imports that the device
# image does not have (the tests' oracle), and liger-kernel (a benchmark baseline).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "trl>=0.20" "datasets" "dill<0.4.2" "multiprocess<0.70.20" "liger-kernel>=0.5"
ls -la .whl
