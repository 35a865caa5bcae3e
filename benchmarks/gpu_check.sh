#!/usr/bin/env bash
# The one command to run on a lent GPU (see the device tool's README): ≤ 5 minutes on an H100 or
# H200, phases in order of value, each under its own time limit, each appending its table to
# $OUT/tables.md the moment it finishes, so a run cut off at any point still returns what it measured.
#
#   here:    bash benchmarks/fetch_gpu_wheels.sh        # optional: trl (oracle) + liger (baseline)
#   device:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=330)
#            run(command="bash benchmarks/gpu_check.sh decode kv", ...)   # only some phases
#
# Default phases (limits in seconds, 300 together):
#   tests 70       the CUDA tests of the kernels, the paged models and their decode graphs, the
#                  engine and its device-work counters (pytest-xdist, 8 workers: kernels compile in parallel)
#   rollout 100    bench_rollout at Qwen2.5-1.5B/7B shapes: engine (eager, CUDA graphs) vs the GKD way,
#                  graphs vs eager token for token, profile, counters
#   train 45       one training step at those shapes
#   divergence 40  fused loss fwd+bwd and forward-only vs the GEMM floor (fkl, default shapes)
#   kv 15          truncation: host and GPU µs per call
#   decode 30      decode attention at 64 × 8k and 8 × 32k context vs copy bandwidth
# By name only: chunks (fused loss fwd+bwd at Qwen2.5-1.5B/7B heads with 256 to 2048 rows per chunk:
# the data to tune the chunk size by), trainers (vs Liger/TRL), synthesis (the paged engine vs the scripts'
# loop, and the vLLM backend where vLLM is installed: the device image has none, so it is skipped there), schedule
# (continuous batching with pages on demand vs static batches on the toy: rows/s, peak pool), resources
# (registers/spills), alltests.
#
# What comes back (the device tool returns at most 8 files): env.txt, tables.md (every finished
# phase's table), phases.log (every phase's output, progress lines included), tests.log,
# results.jsonl (one JSON record per finished benchmark), gpu_check.tgz (all of it, at the end).
# The device image has torch, triton and transformers; the project runs from the tree and pip never
# resolves anything there. Without the wheels the TRL-oracle tests skip (their float64 reference is
# checked against TRL in CI) and the divergence benchmark has no Liger row.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out/gpu}
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
phases=${*:-tests rollout train divergence kv decode}
{
  date -u
  git log -1 --format='commit %h %s' 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c 'import sys, torch, triton, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
  python3 -c 'import trl; print("trl", trl.__version__)' 2>&1 | tail -1
  python3 -c 'import liger_kernel; print("liger-kernel present")' 2>&1 | tail -1
  echo "phases: $phases"
} | tee "$out/env.txt"

GPU_TESTS="tests/kernels tests/test_models.py tests/test_decode_graphs.py tests/test_engine.py tests/test_rollout_work.py tests/test_lm_heads.py"

# run_phase NAME LIMIT STEM COMMAND...: runs COMMAND under LIMIT seconds, its output into
# phases.log; then appends <STEM>.md to tables.md and <STEM>.json to results.jsonl if it wrote them.
run_phase() {
  local name=$1 limit=$2 stem=$3
  shift 3
  local start=$SECONDS
  echo "=== $(date -u +%T) phase $name (limit ${limit}s)" | tee -a "$out/phases.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/phases.log" | grep -E '^\[|^\||passed|failed|error' | tail -40
  local status=${PIPESTATUS[0]}
  [ "$status" = 124 ] && echo "phase $name cut off at its ${limit}s limit" | tee -a "$out/phases.log"
  if [ -n "$stem" ] && [ -f "$work/$stem.md" ]; then
    { echo; echo "<!-- phase $name, $(date -u +%FT%TZ), exit $status -->"; cat "$work/$stem.md"; } >> "$out/tables.md"
    [ -f "$work/$stem.json" ] && python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$work/$stem.json" >> "$out/results.jsonl"
  fi
  echo "=== phase $name: exit $status after $((SECONDS - start))s" | tee -a "$out/phases.log"
}

for phase in $phases; do
  case $phase in
    tests) run_phase tests 70 "" bash -c "python3 -m pytest -q -p no:cacheprovider -rs -n 8 $GPU_TESTS 2>&1 | tee $out/tests.log" ;;
    alltests) run_phase alltests 300 "" bash -c "python3 -m pytest -q -p no:cacheprovider -rs -n 8 tests 2>&1 | tee $out/tests.log" ;;
    rollout) run_phase rollout 100 rollout python3 benchmarks/bench_rollout.py --out "$work" ;;
    train) run_phase train 45 train_step python3 benchmarks/bench_train_step.py --out "$work" ;;
    divergence) run_phase divergence 40 results python3 benchmarks/bench_divergence.py --out "$work" --kinds fkl ;;
    kv) run_phase kv 15 kv_truncate python3 benchmarks/bench_kv_truncate.py --out "$work" ;;
    decode) run_phase decode 30 decode python3 benchmarks/bench_decode.py --out "$work" --attention-only ;;
    chunks) run_phase chunks 60 results python3 benchmarks/bench_divergence.py --out "$work" --kinds fkl \
      --shapes "8192,1536,3584,151936;1024,1536,3584,151936" --chunk-sizes 256,1024,2048 ;;
    trainers) run_phase trainers 150 trainers python3 benchmarks/bench_trainers.py --out "$work" ;;
    synthesis) run_phase synthesis 200 synthesis python3 benchmarks/bench_synthesis.py --out "$work" ;;
    schedule) run_phase schedule 60 schedule python3 benchmarks/bench_schedule.py --out "$work" ;;
    resources) run_phase resources 60 "" bash -c "python3 benchmarks/kernel_resources.py | tee $out/resources.md" ;;
    *) echo "unknown phase $phase" ;;
  esac
done
tar czf "$out/gpu_check.tgz" -C "$work" .
ls -la "$out"
