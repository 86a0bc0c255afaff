#!/usr/bin/env bash
# The main job: put the raw data under data/ (tracked by data.dvc), then `dvc repro` the MESA
# pipeline (params.yaml, dvc.yaml). Extra arguments go to `dvc repro` (e.g. a stage name, -f).
# Only dvc.yaml is reproduced unless a target is given: the project's other pipelines
# (reproduce/dvc.yaml, zoo/dvc.yaml) take hours and run on their own (docs/architecture.md).
#
#   scripts/run_pipeline.sh            # from a fresh clone, after scripts/setup.sh
#   MESA_DATA_SOURCE=/path/to/cifar10.tar.gz scripts/run_pipeline.sh
#   MESA_PREFECT=ephemeral scripts/run_pipeline.sh   # no Prefect server: ~10 s more per stage
#
# Data source (first found): data/ already filled; `dvc pull data.dvc` from the DVC remote;
# $MESA_DATA_SOURCE; ../shared/datasets/cifar10-jpeg.tar.gz; the canonical CIFAR-10 download.
# Prefect: with PREFECT_API_URL set, that server is used; otherwise a local `prefect server`
# is started for the duration of the run (each stage then spends ~1 s, not ~10 s, on Prefect).
# MLflow: MLFLOW_TRACKING_URI if set, else ./mlflow.db (browse with `mlflow ui`). The run's parent
# MLflow run is opened here and named to every stage (MESA_PIPELINE_RUN_ID); it is closed after
# `dvc repro` with dvc.lock attached, the exact record of what DVC ran.
# The end: a short summary table (`dvc metrics show` lists every metric).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH="$root/.venv/bin:$PATH"
export MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
export GX_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=true
export PREFECT_HOME="${PREFECT_HOME:-$root/.prefect}"
# A temporary Prefect API (flows.fetch, MESA_PREFECT=ephemeral) gets 20 s to start by default: not
# enough on 2 busy cores (seen: "Timed out while attempting to connect to ephemeral ... server").
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}"

python -m tasks.common.params check params.yaml >/dev/null   # a bad key stops here, named
TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$root/mlflow.db}

# 1. Raw data into data/, tracked by data.dvc.
if [ -z "$(ls -A data 2>/dev/null)" ]; then
  if [ -f data.dvc ] && dvc pull -q data.dvc 2>/dev/null && [ -n "$(ls -A data 2>/dev/null)" ]
  then
    echo "data/ restored from the DVC remote"
  else
    python -m flows.fetch
  fi
fi
dvc add -q data            # records data/ in data.dvc (nothing to do if unchanged)
dvc push -q data.dvc || echo "warning: could not push data/ to the DVC remote" >&2

# 2. Anything to do? A no-op run stops here, in seconds.
targets=(dvc.yaml)
for arg in "$@"; do [[ $arg == -* ]] || targets=(); done   # the user named a target
if [ $# -eq 0 ] && dvc status -q dvc.yaml 2>/dev/null; then
  echo "Pipeline is up to date (dvc status): nothing to reproduce."
  python -m tasks.pipeline.summary "$TRACKING_URI" || true
  exit 0
fi

# 3. A Prefect API for the stage flows.
server_pid=""
parent_run=""
cleanup() {
  local status=$?
  if [ -n "$parent_run" ]; then
    python -m tasks.common.tracking close "$parent_run" \
      "$([ $status -eq 0 ] && echo FINISHED || echo FAILED)" dvc.lock || true
  fi
  if [ -n "$server_pid" ]; then
    kill -- "-$server_pid" 2>/dev/null || kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
if [ -z "${PREFECT_API_URL:-}" ] && [ "${MESA_PREFECT:-server}" != ephemeral ]; then
  port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$PREFECT_HOME"
  setsid prefect server start --host 127.0.0.1 --port "$port" >"$PREFECT_HOME/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 120); do
    if python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/api/health', timeout=1)" 2>/dev/null; then
      export PREFECT_API_URL="http://127.0.0.1:$port/api"
      break
    fi
    sleep 0.5
  done
  if [ -z "${PREFECT_API_URL:-}" ]; then
    echo "warning: Prefect server did not start (see $PREFECT_HOME/server.log); each stage uses an ephemeral one" >&2
    cleanup; server_pid=""
  else
    echo "Prefect server for this run: ${PREFECT_API_URL%/api} (log: $PREFECT_HOME/server.log)"
  fi
fi

# 4. Reproduce, every stage under one MLflow parent run.
parent_run=$(python -m tasks.common.tracking open params.yaml)
export MESA_PIPELINE_RUN_ID=$parent_run
dvc repro "${targets[@]}" "$@"
echo
python -m tasks.pipeline.summary "$TRACKING_URI"
