#!/usr/bin/env bash
# The checks of a GPU validation run, most important first, each under its own time limit so that a
# short run still brings back what finished. Run from the repository root on the GPU machine
# (torch, triton, pytest, pytest-xdist and hypothesis preinstalled; nothing is installed):
#
#     bash scripts/gpu_session.sh COMMIT [BUDGET_SECONDS] [PHASE]
#
# PHASE "main" (default), about 11 minutes: build; the benchmark of the acceptance cases with
# nothing else on the machine (host-bound timings taken beside other work are worthless); the
# host-overhead record (python -m bench --overhead: kernels per call from the CUDA profiler); a
# few KDAS training steps at 352 x 352, batch 16, bf16, with --backend auto and torch; then side
# by side the test suite on CUDA (pytest-xdist), the three sanitizers over
# tests/sanitize_workload.py and the >2^31-element tests. PHASE "verify" (after fixes): build,
# then side by side the tests that run a GPU backend (ids with cuda or triton), the sanitizers
# over the ops in $SANITIZE_OPS (comma-separated; default all) and the >2^31-element tests.
# PHASE "more": the remaining benchmark cases, then the long fuzz profile on CUDA (a second call
# on the same machine keeps the build).
#
# Logs and the records the steps write (bench/results/, tests/sanitizers/) are packed, by their
# repository paths, into $OUT/session.tgz after every step, with $OUT/summary.txt beside it (the
# host's load average is logged with every step). A step that hits its limit is interrupted
# (SIGINT: pytest still prints its failures, python -m bench writes the cases that finished) and
# the next one runs; steps that would start with less than a minute of the budget left are
# skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
COMMIT=${1:?usage: gpu_session.sh COMMIT [BUDGET_SECONDS] [main|verify|more]}
BUDGET=${2:-660}
PHASE=${3:-main}
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-session}
LOGS=gpu-session-logs
mkdir -p "$OUT" "$LOGS"
touch "$LOGS/started"  # records newer than this are this run's
START=$SECONDS

pack() {
  local records
  records=$(find bench/results tests/sanitizers -newer "$LOGS/started" -type f 2>/dev/null)
  # shellcheck disable=SC2086  # one path per word: the records' names have no spaces
  tar czf "$OUT/session.tgz" "$LOGS" $records
}

step() {  # step NAME LIMIT CMD...: run CMD for at most LIMIT seconds (less if the budget is short)
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 60 ]; then
    echo "$name skipped: ${left}s of the budget left" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout -s INT -k 15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0))s (limit ${limit}s, load $(cut -d' ' -f1-3 /proc/loadavg)):" \
    "$(tail -n 1 "$LOGS/$name.log")" | tee -a "$OUT/summary.txt"
  pack
}

{
  echo "commit $COMMIT, phase $PHASE, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee -a "$OUT/summary.txt"

PYTEST=($PY -m pytest -q -p no:cacheprovider --timeout 240 --tb=short)
SANITIZE=($PY tests/sanitize.py --commit "$COMMIT" --targets workload --timeout 220
          ${SANITIZE_OPS:+--ops "$SANITIZE_OPS"})
build() {
  step build 180 env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST=9.0 KDKERNELS_FORCE_CUDA=1 \
    $PY -m pip install --no-build-isolation --no-deps -e .
}
gpu_checks() {  # gpu_checks LIMIT PYTEST-ARGS...: the tests, the sanitizers, the huge tensors
  local limit=$1
  shift
  # Correctness first; the sanitizers and the huge tensors use the GPU, the suite mostly the CPUs.
  step tests "$limit" "${PYTEST[@]}" -n 10 --maxfail=100 -rfE "$@" &
  for tool in memcheck racecheck initcheck; do
    step "sanitize_$tool" "$limit" "${SANITIZE[@]}" --tools "$tool" &
  done
  step huge_tensors "$limit" "${PYTEST[@]}" -rfE -m slow tests/test_huge_tensors.py \
    tests/test_64bit_offsets.py &
  wait
}
train() {  # train NAME BACKEND [ARGS]: a few KDAS steps at the benchmark's training size
  local name=$1 backend=$2
  shift 2
  step "train_$name" 75 $PY -m models.train --recipe kdas --image-size 352 --batch-size 16 --amp \
    --epochs 1 --teacher-epochs 1 --train-samples 160 --test-samples 16 --backend "$backend" \
    --out "$LOGS/train_$name" "$@"
}
case $PHASE in
  main)
    build
    step bench_acceptance 200 $PY -m bench --device cuda --cases acceptance_b8,acceptance_96_mse
    step bench_overhead 60 $PY -m bench --device cuda --overhead
    train auto auto
    train torch torch
    train compile torch --compile-losses
    gpu_checks $((BUDGET - (SECONDS - START) - 5)) -m "not slow" tests ;;
  verify)
    build
    gpu_checks $((BUDGET - (SECONDS - START) - 5)) -m "not slow" -k "cuda or triton" tests ;;
  more)
    step bench_rest 300 $PY -m bench --device cuda --cases \
      kdas_features,hlfd_at,cpkd_c128,kdas,kdas_l1,hlfd,kdas_binary,ltg_logits,cpkd_56_mse,cpkd_56_kl,cpkd_88_mse,cpkd_88_kl,memory_128_mse,memory_128_kl
    step fuzz_long 240 "${PYTEST[@]}" -n 8 -rfE tests/test_fuzz.py --hypothesis-profile long -k cuda ;;
  *) echo "unknown phase $PHASE (main, verify or more)" >&2; exit 2 ;;
esac
echo "total $((SECONDS - START))s" | tee -a "$OUT/summary.txt"
cp "$OUT/summary.txt" "$LOGS/"
pack
