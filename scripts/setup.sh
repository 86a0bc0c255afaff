#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies (idempotent).
# torch/torchvision come from the machine's local wheel cache through pip (not uv/poetry).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --disable-pip-version-check -q -e '.[dev]'
  rm -f .venv/.installed-* && touch "$stamp"
fi
