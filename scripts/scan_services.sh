#!/usr/bin/env bash
# The scan service on 127.0.0.1 (docs/scanning.md):
#   bash scripts/scan_services.sh start    # Prefect server, MLflow server, scheduled deployment
#   bash scripts/scan_services.sh status   # what runs, where, and the URLs
#   bash scripts/scan_services.sh stop     # deployment first, then the servers
# Prefect: `prefect server start` (SQLite under the state folder). MLflow: `mlflow server` with a
# SQLite backend, artifacts served over HTTP. Deployment: `python -m flows.scan serve`, i.e.
# flow.serve with the schedule of params.yaml scan.interval_s / scan.cron.
# State (PREFECT_HOME, databases, artifacts, logs, pids, claims): params.yaml scan.state_folder
# (.scan/, git-ignored). Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000). Telemetry is off.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
PARAMS=${SCAN_PARAMS:-params.yaml}
STATE=$("$PY" -c "import sys; from tasks.common.params import load_params; \
print(load_params(sys.argv[1]).scan.state_folder)" "$PARAMS")
case $STATE in /*) ;; *) STATE=$ROOT/$STATE ;; esac
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
RUN=$STATE/run
LOGS=$STATE/logs
export PREFECT_HOME=$STATE/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export MLFLOW_DISABLE_TELEMETRY=true GX_ANALYTICS_ENABLED=false
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
PREFECT_HEALTH=$PREFECT_API_URL/health
MLFLOW_HEALTH=$MLFLOW_TRACKING_URI/health

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
healthy() { "$PY" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)" "$1" \
  >/dev/null 2>&1; }

wait_healthy() {  # name url seconds
  local i
  for ((i = 0; i < $3; i++)); do
    if healthy "$2"; then echo "$1: healthy at ${2%/health} after ${i} s"; return 0; fi
    if ! alive "$1"; then echo "$1 exited; see $LOGS/$1.log" >&2; tail -20 "$LOGS/$1.log" >&2; return 1; fi
    sleep 1
  done
  echo "$1: not healthy after $3 s; see $LOGS/$1.log" >&2
  return 1
}

launch() {  # name command...: own session (process group), so stop can end it whole
  local name=$1
  shift
  if alive "$name"; then echo "$name: already running (pid $(cat "$RUN/$name.pid"))"; return 0; fi
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
}

stop_one() {  # name: TERM the process group, KILL after 20 s
  local name=$1 pid i
  alive "$name" || { rm -f "$RUN/$name.pid"; echo "$name: not running"; return 0; }
  pid=$(cat "$RUN/$name.pid")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 20; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
  rm -f "$RUN/$name.pid"
  echo "$name: stopped"
}

start() {
  mkdir -p "$RUN" "$LOGS" "$PREFECT_HOME" "$STATE/mlflow/artifacts"
  for pair in "prefect $PREFECT_HEALTH" "mlflow $MLFLOW_HEALTH"; do
    set -- $pair
    if ! alive "$1" && healthy "$2"; then
      echo "$1: something else already answers ${2%/health}; set ${1^^}_PORT" >&2; exit 1
    fi
  done
  launch prefect "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  # No job-execution workers (MLflow 3's huey consumers): the scan needs none of them.
  launch mlflow env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" \
    --artifacts-destination "$STATE/mlflow/artifacts"
  wait_healthy prefect "$PREFECT_HEALTH" 120
  wait_healthy mlflow "$MLFLOW_HEALTH" 120
  launch deployment "$PY" -m flows.scan serve --params "$PARAMS"
  sleep 3
  alive deployment || { echo "deployment exited; see $LOGS/deployment.log" >&2;
                        tail -20 "$LOGS/deployment.log" >&2; exit 1; }
  status
}

status() {
  for name in prefect mlflow deployment; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"
    else echo "$name: stopped"; fi
  done
  healthy "$PREFECT_HEALTH" && echo "Prefect UI: http://127.0.0.1:$PREFECT_PORT" || true
  healthy "$MLFLOW_HEALTH" && echo "MLflow UI:  $MLFLOW_TRACKING_URI" || true
  echo "logs: $LOGS/  drop folder: $("$PY" -c "import sys; from tasks.common.params import load_params; \
print(load_params(sys.argv[1]).scan.drop_folder)" "$PARAMS")/"
  echo "to run flows by hand against these servers:"
  echo "  export PREFECT_API_URL=$PREFECT_API_URL MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
}

case ${1:-} in
  start) start ;;
  stop) stop_one deployment; stop_one mlflow; stop_one prefect ;;  # runners before servers
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
