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
# DVC stages call `python`. A .pth line, run at every start of this venv's interpreter, puts the
# venv's bin first on PATH, so `.venv/bin/dvc repro ...` runs every stage (dvc.yaml,
# reproduce/dvc.yaml, zoo/dvc.yaml) with the project's interpreter whether or not the venv is
# activated. Written here, not by a library: site's "import" lines in .pth files are Python's
# own start-up hook, and no package does this one line.
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo 'import os, sys; b = os.path.dirname(sys.executable); p = os.environ.get("PATH", ""); os.environ["PATH"] = p if p.startswith(b + os.pathsep) else b + os.pathsep + p' \
  > "$site/mesa_venv_path.pth"
