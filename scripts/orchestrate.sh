#!/usr/bin/env bash
# One command for the scheduled set-up on this machine: a local Prefect server (SQLite under
# .prefect/), the cpu and gpu work pools, the deployments (nightly cron from params.yaml), and
# one worker per pool. Ctrl-C stops the workers, then the server.
#   bash scripts/orchestrate.sh [port] [host]
# Dashboard: http://<host>:${port}  (trigger a run: prefect deployment run fin-tasks/nightly)
#
# The server listens on loopback (127.0.0.1) unless a host is given (0.0.0.0, or this
# machine's address, for GPU machines to reach it). Beyond loopback it starts only with basic
# auth on: export PREFECT_SERVER_API_AUTH_STRING='user:password' first (from a secret store,
# never params.yaml); every client and worker then sets PREFECT_API_AUTH_STRING to the same.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
port="${1:-4200}"
host="${2:-127.0.0.1}"
if [[ "$host" != "127.0.0.1" && "$host" != "localhost" && -z "${PREFECT_SERVER_API_AUTH_STRING:-}" ]]; then
  echo "orchestrate.sh: serving on $host (beyond loopback) needs basic auth:" \
       "export PREFECT_SERVER_API_AUTH_STRING='user:password' and give workers the same in" \
       "PREFECT_API_AUTH_STRING" >&2
  exit 2
fi
if [[ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" ]]; then
  export PREFECT_SERVER_API_AUTH_STRING
  export PREFECT_API_AUTH_STRING="$PREFECT_SERVER_API_AUTH_STRING"  # this machine's clients
fi
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
mkdir -p "$PREFECT_HOME"
export PREFECT_API_URL="http://127.0.0.1:${port}/api"
export PREFECT_LOGGING_EXTRA_LOGGERS=fin_tasks
set -m  # each background job in its own process group: signals reach workers and server
prefect server start --host "$host" --port "$port" > "$PREFECT_HOME/server.log" 2>&1 &
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
