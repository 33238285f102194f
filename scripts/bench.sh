#!/usr/bin/env bash
# The benchmark: set up .venv and build, then `python -m bench` (fused kernels vs eager PyTorch
# and torch.compile; a record under bench/results/). Pass --quick for a short run, --sweep for the
# pixel-relation sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m bench "$@"
