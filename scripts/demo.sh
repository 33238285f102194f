#!/usr/bin/env bash
# The main job: set up .venv and build, then run the benchmark (fused kernels vs eager PyTorch
# and torch.compile) and write its record under bench/results/. Pass --quick for a short run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m bench "$@"
