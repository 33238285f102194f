#!/usr/bin/env bash
# The checks of a GPU session, most important first, each under its own time limit so that a short
# device lease still brings back what ran: build, the test suite on CUDA, the sanitizers, the
# >2^31-element tests, the benchmarks. Run from the repository root on the GPU machine (torch,
# triton, pytest and hypothesis preinstalled; nothing is installed):
#
#     bash scripts/gpu_session.sh COMMIT [BUDGET_SECONDS]
#
# Logs, a summary and the records the steps write (bench/results/, tests/sanitizers/) are copied
# under $OUT (default gpu-session/), by their repository paths, to be committed from there.
# A step that hits its limit is killed and the next one runs; steps that would start with less
# than a minute of the budget left are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
COMMIT=${1:?usage: gpu_session.sh COMMIT [BUDGET_SECONDS]}
BUDGET=${2:-540}
OUT=${OUT:-gpu-session}
mkdir -p "$OUT"
touch "$OUT/started"  # records newer than this are this session's
START=$SECONDS

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
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
}

{
  echo "commit $COMMIT, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/summary.txt"

step build 240 env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST=9.0 KDKERNELS_FORCE_CUDA=1 \
  pip install --no-build-isolation --no-deps -e .
# Correctness on the device first: the regressions, edge values and determinism, then the rest.
step tests_hardening 150 python -m pytest -q -p no:cacheprovider --maxfail=30 \
  tests/test_fuzz_regressions.py tests/test_edge_values.py tests/test_determinism.py
step tests 300 python -m pytest -q -p no:cacheprovider --maxfail=50 -m "not slow" tests
step sanitizers 240 python tests/sanitize.py --commit "$COMMIT" --timeout 100
step huge_tensors 150 python -m pytest -q -p no:cacheprovider -m slow \
  tests/test_huge_tensors.py tests/test_64bit_offsets.py
step fuzz_long 240 python -m pytest -q -p no:cacheprovider tests/test_fuzz.py \
  --hypothesis-profile long -k cuda
step bench 300 python -m bench --device cuda

for d in bench/results tests/sanitizers; do
  [ -d "$d" ] && find "$d" -newer "$OUT/started" -type f -exec cp --parents {} "$OUT" \;
done
echo "total $((SECONDS - START))s" | tee -a "$OUT/summary.txt"
