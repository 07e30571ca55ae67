-- wrk load for llama-serve: POST /v1/completions, non-streaming.
-- MAX_TOKENS (env) sets the completion length; with 1, latency ~ time to first token.
-- Usage: wrk -t2 -c16 -d20s --latency -s scripts/bench/completions.lua http://127.0.0.1:8000
local max_tokens = tonumber(os.getenv("MAX_TOKENS") or "16")
wrk.method = "POST"
wrk.path = "/v1/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = string.format(
  '{"model":"tiny-llama","prompt":"The quick brown fox jumps over the lazy dog. Once upon a time","max_tokens":%d,"temperature":0,"ignore_eos":true}',
  max_tokens)

local errors = 0
function response(status, headers, body)
  if status ~= 200 then errors = errors + 1 end
end

function done(summary, latency, requests)
  io.write(string.format("requests/s %.1f, latency p50 %.1f ms, p99 %.1f ms, non-2xx %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status))
end
