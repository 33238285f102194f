#!/usr/bin/env bash
# The test command: set up .venv and build (scripts/setup_env.sh), run the C++ unit tests
# (CMake/CTest, plus a compile check of the CUDA kernels when nvcc is there), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh

if command -v cmake >/dev/null 2>&1; then
  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build/cmake -j "${MAX_JOBS:-2}"
  ctest --test-dir build/cmake --output-on-failure
fi

.venv/bin/python -m pytest -q "$@"
