#!/usr/bin/env bash
# One command for the scheduled set-up on this machine: a local Prefect server (SQLite under
# .prefect/), the cpu and gpu work pools, the deployments (nightly cron from params.yaml), and
# one worker per pool. Ctrl-C stops the workers, then the server.
#   bash scripts/orchestrate.sh [port]
# Dashboard: http://127.0.0.1:${port}  (trigger a run: prefect deployment run fin-tasks/nightly)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
port="${1:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
mkdir -p "$PREFECT_HOME"
export PREFECT_API_URL="http://127.0.0.1:${port}/api"
export PREFECT_LOGGING_EXTRA_LOGGERS=fin_tasks
set -m  # each background job in its own process group: signals reach workers and server
prefect server start --host 127.0.0.1 --port "$port" > "$PREFECT_HOME/server.log" 2>&1 &
server=$!
workers=()
stop() {
  for pid in "${workers[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${workers[@]}"; do wait "$pid" 2>/dev/null || true; done
  kill -TERM -- "-$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}
trap stop EXIT INT TERM
for _ in $(seq 120); do
  curl -fs "$PREFECT_API_URL/health" > /dev/null && break
  sleep 1
done
python -m flows.deploy --params params.yaml
prefect worker start --pool cpu --limit 4 > "$PREFECT_HOME/worker-cpu.log" 2>&1 &
workers+=($!)
prefect worker start --pool gpu --limit 1 > "$PREFECT_HOME/worker-gpu.log" 2>&1 &
workers+=($!)
echo "Prefect dashboard: http://127.0.0.1:${port}  (logs in $PREFECT_HOME; Ctrl-C stops)"
wait
