#!/usr/bin/env bash
# Start a local Prefect server (API + UI) for loraflow and wait until it answers.
#
#   infra/start-prefect-server.sh            # foreground; Ctrl-C stops it
#   infra/start-prefect-server.sh --background
#   export PREFECT_API_URL=http://127.0.0.1:4200/api   # then loraflow run/serve use it
#   open http://127.0.0.1:4200                          # the UI
#
# State (SQLite database, logs) lives in $PREFECT_HOME (default ~/.prefect). Bound to
# loopback; put it behind a reverse proxy with auth before exposing it (set
# PREFECT_SERVER_HOST=0.0.0.0 only on a trusted network).
set -euo pipefail
HOST="${PREFECT_SERVER_HOST:-127.0.0.1}"
PORT="${PREFECT_SERVER_PORT:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$HOME/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
URL="http://$HOST:$PORT"

if [[ "${1:-}" != "--background" ]]; then
  echo "Prefect UI: $URL   API: $URL/api   (export PREFECT_API_URL=$URL/api)"
  exec prefect server start --host "$HOST" --port "$PORT"
fi

mkdir -p "$PREFECT_HOME"
LOG="$PREFECT_HOME/server.log"
nohup prefect server start --host "$HOST" --port "$PORT" >"$LOG" 2>&1 &
PID=$!
echo "$PID" >"$PREFECT_HOME/server.pid"
for _ in $(seq 1 120); do
  if curl -fsS "$URL/api/health" >/dev/null 2>&1; then
    echo "Prefect server up (pid $PID): UI $URL   API $URL/api"
    echo "  export PREFECT_API_URL=$URL/api"
    echo "  stop: kill \$(cat $PREFECT_HOME/server.pid)"
    exit 0
  fi
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "Prefect server exited; see $LOG" >&2
    tail -20 "$LOG" >&2
    exit 1
  fi
  sleep 0.5
done
echo "Prefect server did not answer within 60 s; see $LOG" >&2
exit 1
