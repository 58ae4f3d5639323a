#!/usr/bin/env bash
# Creates .venv with mergeforge and its test dependencies. Idempotent and quick when already done.
# Picks the CPU build of torch where there is no GPU, so a fresh machine installs in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.mergeforge-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
$VPY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! $VPY -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $VPY -m pip install -q torch
  else
    # CPU build: small, and on our machines it is served from local disk.
    $VPY -m pip install -q "torch==2.13.0" 2>/dev/null \
      || $VPY -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
      || $VPY -m pip install -q torch
  fi
fi
$VPY -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
