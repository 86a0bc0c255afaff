#!/usr/bin/env bash
# The reproduction's missing cells (reproduce/dvc.yaml) in N parallel single-thread shards
# (default 2 = the cores here); see tasks/dev/shards.py and docs/reproduction.md.
#   bash scripts/reproduce.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m tasks.dev.shards reproduce/dvc.yaml "${1:-2}"
