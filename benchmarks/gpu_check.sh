#!/usr/bin/env bash
# The one command to run on a lent GPU (see the device tool's README): the whole test suite on
# CUDA (compiled kernels), then the divergence benchmark, everything logged under $OUT.
#
#   here:    bash benchmarks/fetch_gpu_wheels.sh        # optional: trl (oracle) + liger (baseline)
#   device:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# The device image has torch, triton and transformers; the project runs from the tree, and pip
# never resolves anything there. Without the wheels the TRL-oracle tests skip (their float64
# reference is checked against TRL in CI) and the benchmark has no Liger row.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c 'import sys, torch, triton, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
  python3 -c 'import trl; print("trl", trl.__version__)' 2>&1 | tail -1
  python3 -c 'import liger_kernel; print("liger-kernel present")' 2>&1 | tail -1
} | tee "$out/env.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tee "$out/tests.log" | tail -40
timeout "${BENCH_TIMEOUT:-280}" python3 benchmarks/bench_divergence.py --out "$out" 2>&1 | tee "$out/bench.log"
