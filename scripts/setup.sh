#!/usr/bin/env bash
# Create .venv and install the project with its test tools. Idempotent: re-runs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  # torch 2.14.1 + torchvision 0.29.1: a matching pair that runs on CPU and GPU (open_clip imports torchvision).
  .venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
