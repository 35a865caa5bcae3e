#!/usr/bin/env bash
# The one command to run on a lent GPU (see the device tool's README): the test suite on CUDA
# (compiled kernels), then the benchmarks, everything logged under $OUT.
#
#   here:    bash benchmarks/fetch_gpu_wheels.sh        # optional: trl (oracle) + liger (baseline)
#   device:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
#            run(command="bash benchmarks/gpu_check.sh decode kv", ...)   # only some phases
#
# Phases: tests, divergence, kv, decode, trainers, rollout, train, synthesis, resources (default: all, in order).
# Their time limits add up to more than one call's 10 minutes: with a 15-minute device budget, run
# `tests divergence kv` first (the kernels' targets), then `decode rollout train` in a second call
# if time is left; `trainers` and `resources` are the cheapest to drop. Each has its own
# time limit so one slow phase cannot eat the call. The device image has torch, triton and
# transformers; the project runs from the tree and pip never resolves anything there. Without the
# wheels the TRL-oracle tests skip (their float64 reference is checked against TRL in CI) and the
# divergence benchmark has no Liger row.
set -uo pipefail
cd "$(dirname "$0")/.."
# The device tool returns at most 8 files from $OUT: phases write to a work folder, which is then
# packed whole into one archive beside the few files worth reading directly.
final=${OUT:-benchmarks/out/gpu}
out=$(mktemp -d)
mkdir -p "$final"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
phases=${*:-tests divergence kv decode trainers rollout train synthesis resources}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c 'import sys, torch, triton, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
  python3 -c 'import trl; print("trl", trl.__version__)' 2>&1 | tail -1
  python3 -c 'import liger_kernel; print("liger-kernel present")' 2>&1 | tail -1
  echo "phases: $phases"
} | tee "$out/env.txt"
for phase in $phases; do
  case $phase in
    tests) timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tee "$out/tests.log" | tail -30 ;;
    divergence) timeout 200 python3 benchmarks/bench_divergence.py --out "$out" 2>&1 | tee "$out/bench_divergence.log" ;;
    kv) timeout 90 python3 benchmarks/bench_kv_truncate.py --out "$out" 2>&1 | tee "$out/bench_kv.log" ;;
    decode) timeout 150 python3 benchmarks/bench_decode.py --out "$out" 2>&1 | tee "$out/bench_decode.log" ;;
    trainers) timeout 150 python3 benchmarks/bench_trainers.py --out "$out" 2>&1 | tee "$out/bench_trainers.log" ;;
    rollout) timeout 240 python3 benchmarks/bench_rollout.py --out "$out" 2>&1 | tee "$out/bench_rollout.log" ;;
    train) timeout 200 python3 benchmarks/bench_train_step.py --out "$out" 2>&1 | tee "$out/bench_train.log" ;;
    synthesis) timeout 200 python3 benchmarks/bench_synthesis.py --out "$out" 2>&1 | tee "$out/bench_synthesis.log" ;;
    resources) timeout 60 python3 benchmarks/kernel_resources.py 2>&1 | tee "$out/resources.md" | tail -20 ;;
    *) echo "unknown phase $phase" ;;
  esac
done
cp "$out/env.txt" "$final/"
cat "$out"/results.md "$out"/kv_truncate.md "$out"/decode.md "$out"/trainers.md "$out"/rollout.md "$out"/train_step.md \
  "$out"/synthesis.md 2>/dev/null \
  > "$final/tables.md"
cp "$out/tests.log" "$final/" 2>/dev/null
cp "$out/resources.md" "$final/" 2>/dev/null
tar czf "$final/gpu_check.tgz" -C "$out" .
ls -la "$final"
