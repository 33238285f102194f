#!/usr/bin/env bash
# The test command: set up .venv and build (scripts/setup_env.sh), run the C++ unit tests
# (CMake/CTest, plus a compile check of the CUDA kernels when nvcc is there), then pytest, then a
# compile check of the Triton kernels for sm_90 (tests/triton_compile_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh

if command -v cmake >/dev/null 2>&1; then
  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build/cmake -j "${MAX_JOBS:-2}"
  ctest --test-dir build/cmake --output-on-failure
fi

# The suite records each distinct Triton launch it interprets; every one must then compile for a
# GPU (sm_90) with the installed Triton, which the interpreter never checks.
export KDK_TRITON_LAUNCHES=build/triton_launches.jsonl
mkdir -p build && rm -f "$KDK_TRITON_LAUNCHES"
.venv/bin/python -m pytest -q "$@"
if [ -s "$KDK_TRITON_LAUNCHES" ]; then
  .venv/bin/python tests/triton_compile_check.py "$KDK_TRITON_LAUNCHES" --jobs "${MAX_JOBS:-2}"
fi
