#!/usr/bin/env bash
# Starts ds4-server with the embedded demo model on a free loopback port and runs the
# official-SDK tests and the bounded load test against it.
#   tests/e2e/run.sh [path/to/ds4-server]   (default: builds it with cargo --release)
# Python: needs openai and anthropic (PY=/root/venv-ds4/bin/python by default).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-/root/venv-ds4/bin/python}
BIN=${1:-}
if [ -z "$BIN" ]; then
  cargo build --release -q -p ds4-server
  BIN="${CARGO_TARGET_DIR:-target}/release/ds4-server"
fi
LOG=$(mktemp)
KEY=e2e-$RANDOM$RANDOM
"$BIN" --port 0 --ctx 4096 --max-queue "${MAX_QUEUE:-16}" --api-key "$KEY" 2>"$LOG" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 100); do grep -q "listening on" "$LOG" && break; sleep 0.1; done
URL=$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$LOG" | head -1)
for _ in $(seq 600); do curl -sf "$URL/health" >/dev/null && break; sleep 0.2; done
export DS4_URL=$URL DS4_API_KEY=$KEY DS4_PID=$PID
"$PY" tests/e2e/sdk_test.py
"$PY" tests/e2e/load_test.py "${CLIENTS:-32}" "${REQUESTS:-10}"
kill -TERM $PID
wait $PID
