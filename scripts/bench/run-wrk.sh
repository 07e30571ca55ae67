#!/usr/bin/env bash
# HTTP benchmark with a load generator that is not ours (wrk): requests/s and
# latency at concurrency 1, 16, 64 on the bundled model, and the per-request
# overhead of the HTTP layer (max_tokens 1 at concurrency 64).
# Needs: apt-get install wrk; a release build (cargo build --release -p llama-server).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${LLAMA_SERVE_BIN:-target/release/llama-serve}
PORT=${PORT:-18000}
"$BIN" --host 127.0.0.1 --port "$PORT" --max-queue 4096 > /tmp/llama-serve-bench.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.2; done
for c in 1 16 64; do
  echo "== concurrency $c, max_tokens 16 =="
  MAX_TOKENS=16 wrk -t$(( c < 2 ? 1 : 2 )) -c$c -d${DURATION:-15s} -s scripts/bench/completions.lua "http://127.0.0.1:$PORT" | tail -1
done
echo "== concurrency 64, max_tokens 1 (HTTP layer + one step per request) =="
MAX_TOKENS=1 wrk -t2 -c64 -d${DURATION:-15s} -s scripts/bench/completions.lua "http://127.0.0.1:$PORT" | tail -1
