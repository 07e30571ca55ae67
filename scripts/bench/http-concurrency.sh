#!/usr/bin/env bash
# Streaming output tokens/s through the HTTP server at concurrency 1, 4, 16
# and 32 (issue 3's load: 128-token prompts, 128 output tokens, EOS ignored),
# on the random 134M-parameter Llama (f32) or any --model given in MODEL.
# Builds the release server and the client (tests/src/bin/http-bench.rs).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p llama-server -p e2e --bin llama-serve --bin http-bench
PORT=${PORT:-18001}
MODEL=${MODEL:-random:134m}
target/release/llama-serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" \
  --max-queue 4096 ${SERVE_ARGS:-} > /tmp/llama-serve-http-bench.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.2; done
target/release/http-bench --url "http://127.0.0.1:$PORT" \
  --concurrency "${CONCURRENCY:-1,4,16,32}" --prompt-len "${PROMPT_LEN:-128}" \
  --max-tokens "${MAX_TOKENS:-128}" --rounds "${ROUNDS:-1}"
