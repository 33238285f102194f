#!/usr/bin/env bash
# Unpacks the benchmark peers (pure-Python packages: Liger-Kernel) into .peers/, which bench/peers.py
# puts on sys.path. For machines where nothing can be installed (a locked-down GPU host): run this
# where the package registry is reachable and carry .peers/ along with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" liger-kernel
rm -rf .peers && mkdir .peers
for wheel in "$tmp"/*.whl; do
  "$PY" -m zipfile -e "$wheel" .peers
done
ls .peers
