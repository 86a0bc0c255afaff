#!/usr/bin/env bash
# The reproduction's missing stages (reproduce/dvc.yaml) in N parallel single-thread shards.
#
#   bash scripts/reproduce.sh [N]        # N shards (default 2 = the cores here)
#
# `dvc repro` runs one stage at a time; this runs each phase's missing stages N at a time, with
# the stage's own command, and records each finished stage in reproduce/dvc.lock (`dvc commit`),
# so an interrupted run resumes where it stopped and `dvc status reproduce/dvc.yaml` stays true.
# Phases: clean models -> selection cells -> the selection -> tuned and paper cells -> report.
# Each shard runs torch on one thread (two 2-thread jobs on 2 cores slow each other 8-10x).
# Logs: reproduce/logs/<stage>.log. Do not time anything else while this runs.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=true GX_ANALYTICS_ENABLED=false
LOGS=reproduce/logs
mkdir -p "$LOGS"

with_retry() {  # dvc takes a repo lock; another shard may hold it for a second
  local i
  for i in $(seq 1 60); do
    if "$@" 2>"$LOGS/.dvc-err-$$"; then rm -f "$LOGS/.dvc-err-$$"; return 0; fi
    grep -q "Unable to acquire lock" "$LOGS/.dvc-err-$$" || { cat "$LOGS/.dvc-err-$$" >&2; return 1; }
    sleep 2
  done
  return 1
}

missing() {  # the stages of a family (clean, select, ...) that are not up to date
  python - "$1" <<'PY'
import subprocess, sys
out = subprocess.run(["dvc", "stage", "list", "reproduce/dvc.yaml", "--name-only"],
                     capture_output=True, text=True, check=True).stdout.split()
for name in out:
    stage = name.split(":")[-1]
    if stage.split("@")[0] != sys.argv[1]:
        continue
    done = subprocess.run(["dvc", "status", "-q", name], capture_output=True).returncode == 0
    if not done:
        print(stage)
PY
}

run_stage() {  # stage name like tuned@0-3: its command, then dvc commit
  local stage=$1 family=${1%%@*} item=${1#*@} cmd
  case $family in
    clean) cmd="python -m tasks.reproduce.clean --seed $item" ;;
    select | tuned | paper)
      cmd="python -m tasks.reproduce.cell --profile $family --seed ${item%-*} --pattern ${item#*-}" ;;
    selection) cmd="python -m tasks.reproduce.report selection" ;;
    report) cmd="python -m tasks.reproduce.report report" ;;
  esac
  echo "$(date +%H:%M:%S) start $stage: $cmd"
  if ! $cmd >"$LOGS/$stage.log" 2>&1; then
    echo "$(date +%H:%M:%S) FAILED $stage (see $LOGS/$stage.log)"; return 1
  fi
  with_retry dvc commit -f -q "reproduce/dvc.yaml:$stage"
  echo "$(date +%H:%M:%S) done $stage"
}
export -f run_stage with_retry
export LOGS

for family in clean select selection tuned paper report; do
  stages=$(missing "$family")
  [ -z "$stages" ] && continue
  echo "$family: $(echo $stages | wc -w) stage(s) to run"
  echo "$stages" | xargs -n 1 -P "$N" bash -c 'run_stage "$0"' || echo "some $family stage failed"
done
echo "status: $(dvc status reproduce/dvc.yaml -q && echo up to date || echo changes remain)"
