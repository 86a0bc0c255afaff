#!/usr/bin/env bash
# The scan service on 127.0.0.1 (docs/scanning.md):
#   bash scripts/scan_services.sh start          # Prefect, MLflow, webhook receiver, deployments
#   bash scripts/scan_services.sh start servers  # the same without the deployments
#   bash scripts/scan_services.sh status         # what runs, where, and the URLs
#   bash scripts/scan_services.sh stop           # deployments first, then the rest
# Prefect: `prefect server start` (SQLite under the state folder). MLflow: `mlflow server` with a
# SQLite backend, artifacts served over HTTP. With params platform.auth (default) MLflow runs its
# basic-auth app and Prefect checks an auth string; the credentials come from the environment or
# <state>/auth/credentials.json, made on first start (tasks/scan/auth.py). The webhook receiver
# (tasks/scan/webhook.py) turns MLflow's signed `model_version.created` posts into Prefect events;
# `start` registers the webhook. Deployments: `python -m flows.scan serve`: the poll on the
# schedule of scan.interval_s / scan.cron, and the event-triggered scan of each new version.
# State (PREFECT_HOME, databases, artifacts, logs, pids, claims, keys, credentials): params
# scan.state_folder (.scan/, git-ignored). Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000), the
# receiver's platform.webhook_port (5050). Telemetry is off.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
PARAMS=${SCAN_PARAMS:-params.yaml}
read -r STATE DROP AUTH WEBHOOK_PORT < <("$PY" -c "import sys; from tasks.common.params import \
load_params; p = load_params(sys.argv[1]); print(p.scan.state_folder, p.scan.drop_folder, \
str(p.platform.auth).lower(), p.platform.webhook_port)" "$PARAMS")
[ -n "${STATE:-}" ] || { echo "cannot read $PARAMS" >&2; exit 1; }
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
WEBHOOK_HEALTH=http://127.0.0.1:$WEBHOOK_PORT/health
CLIENT_ENV=$STATE/auth/client.env
READER_ENV=$STATE/auth/reader.env

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
healthy() { "$PY" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)" "$1" \
  >/dev/null 2>&1; }

credentials() {  # the service's variables into this shell; the publisher's into client.env,
  [ "$AUTH" = true ] || return 0  # the reader's into reader.env
  mkdir -p "$STATE/auth"
  eval "$("$PY" -m tasks.scan.auth env --params "$PARAMS" --role server)"
  (umask 077; "$PY" -m tasks.scan.auth env --params "$PARAMS" --role publisher >"$CLIENT_ENV"
   "$PY" -m tasks.scan.auth env --params "$PARAMS" --role reader >"$READER_ENV")
}

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

wait_served() {  # seconds: until the deployments and their event trigger exist. Returning
  # earlier let a version registered in the first seconds raise an event no trigger was there
  # to see: it then waited for the poll (benchmarks/results/alias_hold_latency.md).
  local i
  for ((i = 0; i < $1; i++)); do
    if grep -q "deployments are being served" "$LOGS/deployment.log" 2>/dev/null; then
      echo "deployment: serving (event trigger live) after ${i} s"; return 0
    fi
    if ! alive deployment; then
      echo "deployment exited; see $LOGS/deployment.log" >&2; tail -20 "$LOGS/deployment.log" >&2
      exit 1
    fi
    sleep 1
  done
  echo "deployment: not serving after $1 s; see $LOGS/deployment.log" >&2
  exit 1
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

start() {  # [servers]: without the deployments
  mkdir -p "$RUN" "$LOGS" "$PREFECT_HOME" "$STATE/mlflow/artifacts"
  for pair in "prefect $PREFECT_HEALTH" "mlflow $MLFLOW_HEALTH" "webhook $WEBHOOK_HEALTH"; do
    set -- $pair
    if ! alive "$1" && healthy "$2"; then
      echo "$1: something else already answers ${2%/health}; choose another port" >&2; exit 1
    fi
  done
  credentials
  local auth_app=()
  [ "$AUTH" = true ] && auth_app=(--app-name mesa-auth)  # basic-auth + no alias on a quarantined version
  launch prefect "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  # No job-execution workers (MLflow 3's huey consumers): the scan needs none of them. Webhooks
  # go to the receiver on 127.0.0.1 over plain HTTP, which MLflow refuses unless told.
  launch mlflow env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true \
    MLFLOW_WEBHOOK_CACHE_TTL=5 \
    "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 "${auth_app[@]}" \
    --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" \
    --artifacts-destination "$STATE/mlflow/artifacts"
  launch webhook "$PY" -m tasks.scan.webhook serve --params "$PARAMS"
  "$PY" -c "import sys; from tasks.common.params import load_params; \
from tasks.scan.signing import ensure_key; print('signing key:', ensure_key(load_params(sys.argv[1])).public)" \
    "$PARAMS"
  wait_healthy prefect "$PREFECT_HEALTH" 120
  wait_healthy mlflow "$MLFLOW_HEALTH" 120
  wait_healthy webhook "$WEBHOOK_HEALTH" 60
  # least privilege: the publisher and reader accounts, the scan experiment the service's own
  [ "$AUTH" = true ] && "$PY" -m tasks.scan.auth accounts --params "$PARAMS"
  MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true \
    "$PY" -m tasks.scan.webhook register --params "$PARAMS"
  if [ "${1:-}" != servers ]; then
    launch deployment "$PY" -m flows.scan serve --params "$PARAMS"
    wait_served 180
  fi
  status
}

status() {
  for name in prefect mlflow webhook deployment; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"
    else echo "$name: stopped"; fi
  done
  healthy "$PREFECT_HEALTH" && echo "Prefect UI: http://127.0.0.1:$PREFECT_PORT" || true
  healthy "$MLFLOW_HEALTH" && echo "MLflow UI:  $MLFLOW_TRACKING_URI" || true
  if [ "$AUTH" = true ] && [ -f "$CLIENT_ENV" ]; then
    local user
    user=$(sed -n "s/^export MLFLOW_TRACKING_USERNAME=//p" "$CLIENT_ENV" | tr -d "'")
    echo "UI login:   MLflow user '$user' (publisher), password: the MLFLOW_TRACKING_PASSWORD line of $CLIENT_ENV;"
    echo "            read-only: the same lines of $READER_ENV;"
    echo "            Prefect (operators only): prefect_auth (user:password) of $STATE/auth/credentials.json"
  fi
  echo "logs: $LOGS/  drop folder: $DROP/"
  echo "to run flows by hand against these servers:"
  echo "  export PREFECT_API_URL=$PREFECT_API_URL MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
  if [ "$AUTH" = true ]; then
    echo "  source $CLIENT_ENV   # a client's MLflow account (the publisher); operators: eval \"\$($PY -m tasks.scan.auth env --role server --params $PARAMS)\""
  fi
}

case ${1:-} in
  start) start "${2:-}" ;;
  stop) stop_one deployment; stop_one webhook; stop_one mlflow; stop_one prefect ;;
  status) status ;;
  *) echo "usage: $0 start [servers]|stop|status" >&2; exit 2 ;;
esac
