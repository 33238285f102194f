#!/usr/bin/env bash
# Creates .venv (if needed) with torch, triton, the test tools, matplotlib (bench plots),
# torchdistill (its integration is tested), lightning (examples/ are tested) and what models/
# needs (the "models" extra of setup.py: timm, torchmetrics, MONAI, tqdm, Pillow), then
# builds kdkernels into it.
# Run by scripts/test.sh, scripts/demo.sh and scripts/bench.sh; safe to run again (reuses what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch 2.14.1 is a CUDA 13 build: with nvcc on the PATH the CUDA kernels compile and link even
# on a machine without a GPU. Pinned so every machine builds against the same headers.
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 numpy triton ninja \
  pytest hypothesis pytest-benchmark matplotlib torchdistill lightning timm torchmetrics monai scipy tqdm pillow

if command -v nvcc >/dev/null 2>&1 && [ "${KDKERNELS_SKIP_CUDA:-0}" = "0" ]; then
  export KDKERNELS_FORCE_CUDA=1   # fail loudly rather than silently drop the CUDA kernels
fi
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/pip install -q --disable-pip-version-check \
  --no-build-isolation --no-deps -e .
.venv/bin/python -c "import kdkernels as k; print({n: s['available'] for n, s in k.backends().items()})"
