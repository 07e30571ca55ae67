#!/usr/bin/env bash
# Runs the carried CUDA build on the GPU machine: every GPU check and timing
# in one pass, full logs under $OUT, a short table printed last.
#
# Here (build machine, see ../shared/CUDA.md for the toolchain):
#   bash ../shared/tools/setup-cuda-build-env.sh && source /opt/cuda13-pip/env.sh
#   cargo build --release --features cuda -p llama-server -p llama-model -p llama-engine --bins --target-dir target/cuda
#   cargo test --release --features cuda -p llama-model --test reference --test kernels --no-run --target-dir target/cuda
#   bash scripts/gpu-run.sh --pack          # strips + xz-compresses into target/gpu-carry/
# A second build to compare in the same run (e.g. a kernel change on a branch):
# build it as above, then `bash scripts/gpu-run.sh --pack-as NAME` (into
# target/gpu-carry/alt-NAME/), then build and --pack the reference as usual.
# The run then also tests and times NAME's attention kernels and decode, and
# prints them beside the reference's.
# There (device tool, carrying target/gpu-carry):
#   bash scripts/gpu-run.sh [--baseline]
# --baseline also re-measures compiled transformers (static cache) at batch 1
# and 64 in the same run, last (scripts/gpu-transformers-baseline.py; its
# compilation takes a few minutes of device time).
# Dry run on a CPU machine (same steps, CPU device, tiny shapes, the debug build):
#   cargo build --workspace --bins && cargo test -p llama-model --no-run && bash scripts/gpu-run.sh --dry-run
#
# Steps: parity of the tiny fixture (f32, both kernel paths), the fused kernels
# against plain Candle (f32/f16/bf16, GQA 1/4/8, odd lengths, block and tile
# boundaries; prompt attention on tensor cores and on CUDA cores), llama-bench
# on a random 7B in bf16 (and a 512-token prefill with CUDA-core attention:
# before/after in one run), the attention kernels alone, and the engine at 64
# and 200 concurrent requests with the KV pool sized as 90% of the GPU, and at
# 64 with sampling; with --cuda-graphs (after their own test): llama-bench
# decode, the engine, and the server (parity and load); the weight-streaming
# GEMV (after its test): each projection against cuBLAS, and decode at batch 1
# and 4 with and without graphs. Steps are skipped once STEP_BUDGET_S (default 470) seconds
# have gone, so the table always comes back within one device call.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-carry
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"

if [ "${1:-}" = "--pack" ]; then
  mkdir -p "$CARRY"
  for bin in llama-bench engine-bench attention-bench matmul-bench llama-serve; do
    [ -x "target/cuda/release/$bin" ] || continue
    cp "target/cuda/release/$bin" "$CARRY/$bin" && strip "$CARRY/$bin" && xz -T2 -9 -f "$CARRY/$bin"
  done
  for test in reference kernels; do
    test_bin=$(ls -t target/cuda/release/deps/$test-* 2>/dev/null | grep -v "\.d$" | head -n 1)
    if [ -n "$test_bin" ]; then
      cp "$test_bin" "$CARRY/$test" && strip "$CARRY/$test" && xz -T2 -9 -f "$CARRY/$test"
    fi
  done
  ls -la "$CARRY"
  exit 0
fi

if [ "${1:-}" = "--pack-as" ] && [ -n "${2:-}" ]; then
  dir="$CARRY/alt-$2"
  mkdir -p "$dir"
  for bin in llama-bench attention-bench; do
    cp "target/cuda/release/$bin" "$dir/$bin" && strip "$dir/$bin" && xz -T2 -9 -f "$dir/$bin"
  done
  test_bin=$(ls -t target/cuda/release/deps/kernels-* | grep -v "\.d$" | head -n 1)
  cp "$test_bin" "$dir/kernels" && strip "$dir/kernels" && xz -T2 -9 -f "$dir/kernels"
  git describe --always --dirty > "$dir/commit"
  ls -la "$dir"
  exit 0
fi

# 128 new tokens after each prompt, as ../shared/CUDA.md measured transformers
# and as the engine runs below: decode over contexts 128..256 (not 128..160).
DEVICE=cuda; DTYPE=bf16; SHAPE=7b; BATCHES=1,8,32,64; PROMPTS=128,512; GEN=128; SERVE_LOAD=64x128
ENGINE_LEVELS=64,200; ENGINE_KV=90%; BEFORE_PROMPT=512
# Prompts for the prefix-caching run: this long, the first SHARED tokens common to all.
PREFIX_PROMPT=512; PREFIX_SHARED=448
if [ "${1:-}" = "--dry-run" ]; then
  DEVICE=cpu; DTYPE=f32; SHAPE=tiny; BATCHES=1,8; PROMPTS=16; GEN=4; SERVE_LOAD=8x16
  ENGINE_LEVELS=4,8; ENGINE_KV=64MiB; BEFORE_PROMPT=16
  PREFIX_PROMPT=96; PREFIX_SHARED=64
  BIN=target/debug
  for test in reference kernels; do
    t=$(ls -t target/debug/deps/$test-* 2>/dev/null | grep -v '\.d$' | head -n 1)
    [ -n "$t" ] && ln -sf "$PWD/$t" "$OUT/$test" && TESTS_AT="$OUT"
  done
else
  BIN=/tmp/llama-bin
  mkdir -p "$BIN"
  for f in "$CARRY"/*.xz; do xz -dc "$f" > "$BIN/$(basename "$f" .xz)" && chmod +x "$BIN/$(basename "$f" .xz)"; done
  NV=$(python3 -c 'import nvidia, os, glob; print(":".join(sorted({os.path.dirname(p) for r in nvidia.__path__ for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})))')
  export LD_LIBRARY_PATH="$NV:${LD_LIBRARY_PATH:-}"
  export CUDA_CACHE_PATH=/tmp/nv-compute-cache
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  TESTS_AT="$BIN"
fi

status=0
BUDGET=${STEP_BUDGET_S:-470}
# Prints the step's name, or says it is skipped (false) once the budget is spent.
step() {
  if [ "$SECONDS" -ge "$BUDGET" ]; then echo "== skipped (${SECONDS}s gone): $* =="; status=1; return 1; fi
  echo "== [${SECONDS}s] $* =="
}

run_tests() { # log name, test binary, libtest arguments...
  LLAMA_TEST_DEVICE="$DEVICE" LLAMA_REPO_ROOT="$PWD" timeout 100 "$TESTS_AT/$2" --test-threads 1 --nocapture "${@:3}" \
    > "$OUT/$1.log" 2>&1
  local rc=$?
  grep -E "^test |test result" "$OUT/$1.log" | tail -n 20
  return $rc
}
KERNELS=auto
GRAPHS=1; GEMV=1
[ "$DEVICE" = cuda ] || { GRAPHS=0; GEMV=0; }  # CUDA-only paths
if [ -x "${TESTS_AT:-/nonexistent}/reference" ] && step "reference tests on $DEVICE"; then
  run_tests reference reference || status=1
fi
if [ -x "${TESTS_AT:-/nonexistent}/kernels" ]; then
  # The attention test runs alone first: it is the first to launch the
  # tensor-core prefill kernel, and a fault there would poison the CUDA
  # context of every later test in the same process. If it fails, the
  # benchmarks run with prompt attention on CUDA cores.
  if step "kernel tests on $DEVICE: paged attention"; then
    run_tests kernels-attention kernels paged_attention || {
      status=1; KERNELS=cuda-cores
      echo "!! paged attention failed its test: the benchmarks below run with --kernels cuda-cores"
    }
    # Worst relative error per (kernels, dtype) over the shapes.
    awk '/^attention / { k = $2 " " $3; if ($NF + 0 > w[k]) w[k] = $NF + 0 } END { for (k in w) printf "   worst rel %s: %.2e\n", k, w[k] }' \
      "$OUT/kernels-attention.log" | sort
  fi
  if step "kernel tests on $DEVICE: the rest"; then
    run_tests kernels kernels --skip paged_attention --skip decode_graphs --skip gemv || status=1
  fi
  if step "kernel tests on $DEVICE: the weight-streaming GEMV"; then
    run_tests kernels-gemv kernels gemv || {
      status=1; GEMV=0
      echo "!! the GEMV failed its test: no GEMV runs below"
    }
    awk '/^gemv [A-Z]/ { if ($NF + 0 > w[$2]) w[$2] = $NF + 0 } END { for (k in w) printf "   worst rel gemv %s: %.2e\n", k, w[k] }' \
      "$OUT/kernels-gemv.log" | sort
  fi
  # Alone as well: a fault in a replayed graph would poison the context.
  if step "kernel tests on $DEVICE: decode steps replayed as CUDA graphs"; then
    run_tests kernels-graphs kernels decode_graphs || {
      status=1; GRAPHS=0
      echo "!! CUDA graphs failed their test: no graph runs below"
    }
    grep -E "^graphs " "$OUT/kernels-graphs.log"
  fi
fi

bench() { # name, kernels, batches, prompts, gen, time limit
  step "llama-bench $SHAPE $DTYPE on $DEVICE, kernels=$2" || return 0
  timeout "$6" "$BIN/llama-bench" --random-weights "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --kernels "$2" ${PROFILE:-} ${EXTRA:-} \
    --batch-sizes "$3" --prompt-len "$4" --gen "$5" --json > "$OUT/$1.json" 2> "$OUT/$1.log" || { status=1; tail -n 5 "$OUT/$1.log"; }
}
PROFILE=--profile bench bench-fused "$KERNELS" "$BATCHES" "$PROMPTS" "$GEN" 150
# The "before" of the tensor-core prefill kernel: the same prefill with the
# prompt attention on CUDA cores.
bench bench-cuda-cores cuda-cores 1 "$BEFORE_PROMPT" 8 60
# Decode with every step replayed as a CUDA graph: the "after" of graphs,
# beside bench-fused's "before" in the table.
[ "$GRAPHS" = 1 ] && EXTRA=--cuda-graphs bench bench-graphs "$KERNELS" "$BATCHES" "${PROMPTS%%,*}" "$GEN" 120
# Decode projections of up to 4 rows by the weight-streaming kernel instead of
# cuBLAS: each projection alone, then whole decode steps, without and with graphs.
if [ "$GEMV" = 1 ] && step "matmul-bench: 7B projections at 1, 2 and 4 rows, GEMV kernel against cuBLAS (16 and 64: cuBLAS both sides, its bandwidth at the batch-64 goal)"; then
  timeout 60 "$BIN/matmul-bench" --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --rows 1,2,4,16,64 --gemv --baseline \
    > "$OUT/matmul-gemv.md" 2> "$OUT/matmul-gemv.log" || { status=1; tail -n 5 "$OUT/matmul-gemv.log"; }
fi
[ "$GEMV" = 1 ] && EXTRA=--gemv bench bench-gemv "$KERNELS" 1,4 "${PROMPTS%%,*}" "$GEN" 60
[ "$GEMV" = 1 ] && [ "$GRAPHS" = 1 ] && EXTRA="--gemv --cuda-graphs" bench bench-gemv-graphs "$KERNELS" 1,4 "${PROMPTS%%,*}" "$GEN" 60

ATT_CASES=1x128,1x512,1x4096,8x512,64x128,64x512,p1x512,p1x2048,p16x128
PREFILL_CASES=p1x512,p1x2048,p16x128
[ "$DEVICE" = cpu ] && ATT_CASES=1x128,4x64,p1x64 && PREFILL_CASES=p1x64
for kernels in auto cuda-cores; do
  cases=$ATT_CASES; [ "$kernels" = auto ] || cases=$PREFILL_CASES
  step "attention-bench: the paged-attention kernels alone ($DTYPE, 7B heads), kernels=$kernels" || continue
  timeout 40 "$BIN/attention-bench" --device "$DEVICE" --dtype "$DTYPE" --cases "$cases" --kernels "$kernels" --json \
    > "$OUT/attention-$kernels.json" 2> "$OUT/attention-$kernels.log" || { status=1; tail -n 5 "$OUT/attention-$kernels.log"; }
done

if step "engine-bench $SHAPE $DTYPE on $DEVICE at $ENGINE_LEVELS concurrent, KV pool $ENGINE_KV"; then
  timeout 150 "$BIN/engine-bench" --random-weights "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --kernels "$KERNELS" \
    --tokenizer models/tiny-llama --concurrency "$ENGINE_LEVELS" --max-num-batched-tokens 2048 --prompt-len 128 --gen 128 --kv-cache-memory "$ENGINE_KV" --json \
    > "$OUT/engine.json" 2> "$OUT/engine.log" || { status=1; tail -n 5 "$OUT/engine.log"; }
fi

# The "before" of sending a step's tokens while the next one runs (on by
# default on a GPU): each step's tokens sent before the next is scheduled.
if step "engine-bench at ${ENGINE_LEVELS%%,*} concurrent with --overlap off"; then
  timeout 90 "$BIN/engine-bench" --random-weights "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --kernels "$KERNELS" --overlap off \
    --tokenizer models/tiny-llama --concurrency "${ENGINE_LEVELS%%,*}" --max-num-batched-tokens 2048 --prompt-len 128 --gen 128 --kv-cache-memory "$ENGINE_KV" --json \
    > "$OUT/engine-no-overlap.json" 2> "$OUT/engine-no-overlap.log" || { status=1; tail -n 5 "$OUT/engine-no-overlap.log"; }
fi
# The engine's host work on this machine's CPU, with no model: a stand-in
# device taking stop 11's batch-64 step (7.1 ms, of which the host spends
# 3.2 ms submitting), tokens sent after each step and during the next.
if step "engine-bench on a simulated device (7.1 ms steps, 3.2 ms of launch)"; then
  for o in off on; do
    timeout 60 "$BIN/engine-bench" --simulate-device 7.1,3.2 --overlap "$o" --concurrency "$ENGINE_LEVELS" --prompt-len 128 --gen 128 \
      --max-num-batched-tokens 2048 --json > "$OUT/engine-simulated-$o.json" 2> "$OUT/engine-simulated-$o.log" || { status=1; tail -n 5 "$OUT/engine-simulated-$o.log"; }
  done
fi

if [ "$GRAPHS" = 1 ] && step "engine-bench with CUDA graphs at $ENGINE_LEVELS concurrent"; then
  timeout 150 "$BIN/engine-bench" --random-weights "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --kernels "$KERNELS" --cuda-graphs \
    --tokenizer models/tiny-llama --concurrency "$ENGINE_LEVELS" --max-num-batched-tokens 2048 --prompt-len 128 --gen 128 --kv-cache-memory "$ENGINE_KV" --json \
    > "$OUT/engine-graphs.json" 2> "$OUT/engine-graphs.log" || { status=1; tail -n 5 "$OUT/engine-graphs.log"; }
  grep -E "CUDA graphs" "$OUT/engine-graphs.log" | head -n 3
fi

# Automatic prefix caching (on by default): prompts sharing a long system
# prompt, computed once with caching, every time without.
if step "engine-bench: $PREFIX_PROMPT-token prompts sharing $PREFIX_SHARED tokens, prefix caching off and on"; then
  for pc in off on; do
    timeout 120 "$BIN/engine-bench" --random-weights "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --kernels "$KERNELS" \
      --tokenizer models/tiny-llama --concurrency "${ENGINE_LEVELS%%,*}" --rounds 2 --max-num-batched-tokens 2048 \
      --prompt-len "$PREFIX_PROMPT" --shared-prefix "$PREFIX_SHARED" --gen "$GEN" --kv-cache-memory "$ENGINE_KV" --prefix-caching "$pc" --json \
      > "$OUT/engine-prefix-$pc.json" 2> "$OUT/engine-prefix-$pc.log" || { status=1; tail -n 5 "$OUT/engine-prefix-$pc.log"; continue; }
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))["results"][0]; print("   prefix caching {0}: {1[output_tok_s]:.0f} tok/s, TTFT p50 {1[ttft_ms_p50]:.0f} ms, p99 {1[ttft_ms_p99]:.0f} ms, {1[prefix_cache_hit_pct]:.0f}% of prompt tokens cached".format(sys.argv[2], r))' \
      "$OUT/engine-prefix-$pc.json" "$pc" || true
  done
fi

# Sampled requests (temperature 0.8, top-p 0.95, seeded): on a GPU each row is
# picked by the pick_rows kernel next to the logits; close to the greedy
# figure above means the picks cost little.
SAMPLED_LEVEL=${ENGINE_LEVELS%%,*}
if step "engine-bench with sampling at $SAMPLED_LEVEL concurrent"; then
  timeout 90 "$BIN/engine-bench" --random-weights "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --kernels "$KERNELS" \
    --tokenizer models/tiny-llama --concurrency "$SAMPLED_LEVEL" --max-num-batched-tokens 2048 --prompt-len 128 --gen 128 --kv-cache-memory "$ENGINE_KV" \
    --temperature 0.8 --top-p 0.95 --json \
    > "$OUT/engine-sampled.json" 2> "$OUT/engine-sampled.log" || { status=1; tail -n 5 "$OUT/engine-sampled.log"; }
fi

# The real server, as a client sees it: the tiny fixture in f32 on the GPU
# must answer exactly as on the CPU (greedy, streamed and not; seeded draws
# repeat; bad input is a 400 and serving goes on); then concurrent streams
# over HTTP on a random 7B in bf16.
serve() { # log name, port, flags...
  "$BIN/llama-serve" --host 127.0.0.1 --port "$2" "${@:3}" > "$OUT/$1.log" 2>&1 &
  echo $!
}
metric() { # base URL, metric name: prints its line from /metrics
  python3 -c 'import sys, urllib.request; print("".join("   " + l + "\n" for l in urllib.request.urlopen(sys.argv[1] + "/metrics", timeout=5).read().decode().splitlines() if l.startswith(sys.argv[2])), end="")' "$1" "$2" || true
}
# The other builds packed with --pack-as: their attention test, the attention
# kernels alone and decode at batch 1 and 64 (both contexts), beside the
# reference's above; then their graphs test and decode replayed as graphs,
# beside the reference's graph runs.
if [ "$DEVICE" = cuda ]; then
  for dir in "$CARRY"/alt-*/; do
    [ -d "$dir" ] || continue
    name=$(basename "$dir"); alt_bin="/tmp/llama-bin-$name"
    step "$name ($(cat "$dir/commit" 2>/dev/null)): attention test, attention-bench, llama-bench, graphs test and bench" || continue
    mkdir -p "$alt_bin"
    for f in "$dir"*.xz; do xz -dc "$f" > "$alt_bin/$(basename "$f" .xz)" && chmod +x "$alt_bin/$(basename "$f" .xz)"; done
    if TESTS_AT="$alt_bin" run_tests "$name-kernels" kernels paged_attention; then
      echo "   $name: paged attention test passed"
      timeout 40 "$alt_bin/attention-bench" --device cuda --dtype "$DTYPE" --cases "$ATT_CASES" --json \
        > "$OUT/$name-attention.json" 2> "$OUT/$name-attention.log" || status=1
      # Split-K settings (keys per split, split below this many blocks; 0,0
      # is off), where a build reads LLAMA_ATTN_SPLIT; one that does not
      # times its default again.
      for split in 0,0 128,256 256,512 512,512 128,1024; do
        LLAMA_ATTN_SPLIT=$split timeout 30 "$alt_bin/attention-bench" --device cuda --dtype "$DTYPE" --cases 1x512,1x4096,4x2048,8x512 --json \
          > "$OUT/$name-split-$split.json" 2> "$OUT/$name-split-$split.log" || status=1
      done
      timeout 120 "$alt_bin/llama-bench" --random-weights "$SHAPE" --device cuda --dtype "$DTYPE" \
        --batch-sizes 1,64 --prompt-len "$PROMPTS" --gen "$GEN" --json > "$OUT/$name-bench.json" 2> "$OUT/$name-bench.log" || status=1
    else
      status=1
      echo "!! $name: paged attention test failed, not timed"
      grep -E "panicked|rel " "$OUT/$name-kernels.log" | tail -n 5
      continue
    fi
    if [ "$GRAPHS" = 1 ] && TESTS_AT="$alt_bin" run_tests "$name-kernels-graphs" kernels decode_graphs; then
      echo "   $name: graphs test passed"
      timeout 90 "$alt_bin/llama-bench" --random-weights "$SHAPE" --device cuda --dtype "$DTYPE" --cuda-graphs \
        --batch-sizes 1,64 --prompt-len "${PROMPTS%%,*}" --gen "$GEN" --json > "$OUT/$name-bench-graphs.json" 2> "$OUT/$name-bench-graphs.log" || status=1
    elif [ "$GRAPHS" = 1 ]; then
      status=1
      echo "!! $name: graphs test failed"
      grep -E "panicked|rel " "$OUT/$name-kernels-graphs.log" | tail -n 5
    fi
  done
fi

if [ -x "$BIN/llama-serve" ] && step "llama-serve on $DEVICE against the CPU (tiny model, f32): parity over HTTP"; then
  a=$(serve server-gpu 18081 --model models/tiny-llama --device "$DEVICE" --dtype f32 --kv-cache-memory 256MiB)
  b=$(serve server-cpu 18082 --model models/tiny-llama --device cpu --dtype f32)
  timeout 120 python3 scripts/gpu-serve-check.py parity http://127.0.0.1:18081 http://127.0.0.1:18082 \
    > "$OUT/serve-parity.log" 2>&1 || status=1
  cat "$OUT/serve-parity.log"
  kill "$a"; wait "$a" 2>/dev/null
  if [ "$GRAPHS" = 1 ]; then
    echo "   the same with --cuda-graphs on:"
    g=$(serve server-gpu-graphs 18084 --model models/tiny-llama --device "$DEVICE" --dtype f32 --kv-cache-memory 256MiB --cuda-graphs on)
    timeout 120 python3 scripts/gpu-serve-check.py parity http://127.0.0.1:18084 http://127.0.0.1:18082 \
      > "$OUT/serve-parity-graphs.log" 2>&1 || status=1
    cat "$OUT/serve-parity-graphs.log"
    metric http://127.0.0.1:18084 llama_serve_cuda_graph_steps_total
    kill "$g"; wait "$g" 2>/dev/null
  fi
  kill "$b" 2>/dev/null; wait "$b" 2>/dev/null
fi
if [ -x "$BIN/llama-serve" ] && step "llama-serve, random $SHAPE $DTYPE on $DEVICE: $SERVE_LOAD concurrent streams over HTTP"; then
  # With CUDA graphs where they passed their test: the served path of graphs.
  graph_flag=(); [ "$GRAPHS" = 1 ] && graph_flag=(--cuda-graphs on)
  c=$(serve server-load 18083 --model "random:$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --max-num-seqs 256 "${graph_flag[@]}")
  timeout 120 python3 scripts/gpu-serve-check.py load http://127.0.0.1:18083 "${SERVE_LOAD%x*}" "${SERVE_LOAD#*x}" \
    > "$OUT/serve-load.log" 2>&1 || status=1
  tail -n 3 "$OUT/serve-load.log"
  metric http://127.0.0.1:18083 llama_serve_cuda_graph_steps_total
  grep -E "CUDA graphs" "$OUT/server-load.log" | head -n 2
  kill "$c" 2>/dev/null; wait "$c" 2>/dev/null
fi

if [[ " $* " == *" --baseline "* ]] && [ "$DEVICE" = cuda ]; then
  echo "== [${SECONDS}s] transformers, static cache + torch.compile, random 7B bf16 (the comparison point) =="
  timeout 330 python3 scripts/gpu-transformers-baseline.py 1,64 --json > "$OUT/transformers.log" 2>&1 || status=1
  grep -E "^transformers" "$OUT/transformers.log" || tail -n 5 "$OUT/transformers.log"
  tail -n 1 "$OUT/transformers.log" | grep '^{' > "$OUT/transformers.json"
fi

python3 - "$OUT" <<'PY' || status=1
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception as e:
        print(f"({name}: {e})")
        return None
fused, before, engine = load("bench-fused.json"), load("bench-cuda-cores.json"), load("engine.json")
def maybe(name):
    return load(name) if os.path.exists(os.path.join(out, name)) else None
graphs = maybe("bench-graphs.json")
gemv, gemv_graphs = maybe("bench-gemv.json"), maybe("bench-gemv-graphs.json")
engine_graphs = load("engine-graphs.json") if os.path.exists(os.path.join(out, "engine-graphs.json")) else None
sampled = load("engine-sampled.json")
no_overlap = maybe("engine-no-overlap.json")
simulated = {o: maybe(f"engine-simulated-{o}.json") for o in ("off", "on")}
hf = load("transformers.json") if os.path.exists(os.path.join(out, "transformers.json")) else None
att, att_before = load("attention-auto.json"), load("attention-cuda-cores.json")
if att:
    simt = {r["case"]: r for r in (att_before or {}).get("results", [])}
    print("\n| attention case | µs per call | GB/s of K/V read | prompt attention on CUDA cores, µs |")
    print("|---|---:|---:|---:|")
    for r in att["results"]:
        b = simt.get(r["case"])
        print(f"| {r['case']} | {r['us']:.1f} | {r['kv_gb_s']:.0f} | {b['us']:.1f} |" if b else f"| {r['case']} | {r['us']:.1f} | {r['kv_gb_s']:.0f} | - |")
before_rows = {(r["batch"], r["prompt_len"]): r for r in (before or {}).get("results", [])}
if fused:
    print(f"\n{fused['shape']} {fused['dtype']} on {fused['device']}, peak RSS {fused['peak_rss_bytes']/2**20:.0f} MiB")
    print("| batch | context | prefill tok/s (1 prompt) | prefill tok/s, attention on CUDA cores | decode tok/s | ms/step | host submit ms/step |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in fused["results"]:
        g = before_rows.get((r["batch"], r["prompt_len"]))
        gs = f"{g['prefill_tok_s']:.0f}" if g else "-"
        print(f"| {r['batch']} | {r['prompt_len']} | {r['prefill_tok_s']:.0f} | {gs} | {r['decode_tok_s']:.1f} | {r['ms_per_step']:.2f} | {r.get('submit_ms_per_step', float('nan')):.2f} |")
if fused and graphs:
    plain = {(r["batch"], r["prompt_len"]): r for r in fused["results"]}
    print("\n| decode batch | context | without graphs tok/s | with CUDA graphs tok/s | graphs / without | host submit ms/step, with | steps replayed |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in graphs["results"]:
        p = plain.get((r["batch"], r["prompt_len"]))
        if p:
            print(f"| {r['batch']} | {r['prompt_len']} | {p['decode_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / p['decode_tok_s']:.3f} | {r['submit_ms_per_step']:.2f} | {r.get('graph_steps', '-')} |")
if fused and (gemv or gemv_graphs):
    ctx = min(r["prompt_len"] for r in fused["results"])
    by = lambda run: {r["batch"]: r["decode_tok_s"] for r in (run or {}).get("results", []) if r["prompt_len"] == ctx}
    plain, g, v, vg = by(fused), by(graphs), by(gemv), by(gemv_graphs)
    print(f"\n| decode batch (context {ctx}) | cuBLAS tok/s | cuBLAS + graphs | GEMV kernel | GEMV kernel + graphs |")
    print("|---:|---:|---:|---:|---:|")
    cell = lambda d, b: f"{d[b]:.1f}" if b in d else "-"
    for b in sorted(set(v) | set(vg)):
        print(f"| {b} | {cell(plain, b)} | {cell(g, b)} | {cell(v, b)} | {cell(vg, b)} |")
if os.path.exists(os.path.join(out, "matmul-gemv.md")):
    print("\nprojections alone (ours = GEMV kernel, candle = cuBLAS):")
    print(open(os.path.join(out, "matmul-gemv.md")).read())
if fused and fused["results"][0].get("prefill_profile_ms"):
    rows = fused["results"]
    longest = max(r["prompt_len"] for r in rows)
    picks = [("prefill 1x%d" % longest, next(r for r in rows if r["prompt_len"] == longest)["prefill_profile_ms"])]
    for r in rows:
        if r["prompt_len"] == min(x["prompt_len"] for x in rows) and r["batch"] in (min(x["batch"] for x in rows), max(x["batch"] for x in rows)):
            picks.append(("decode b%d ctx%d" % (r["batch"], r["prompt_len"]), r["decode_profile_ms"]))
    names = [n for n, _ in picks[0][1]]
    print("\nwhere a step's time goes (ms, device synced after each stage):")
    print("| stage | " + " | ".join(p for p, _ in picks) + " |")
    print("|---|" + "---:|" * len(picks))
    for name in names:
        vals = [dict(v).get(name, 0.0) for _, v in picks]
        print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in vals) + " |")
    print("| total | " + " | ".join(f"{sum(t for _, t in v):.2f}" for _, v in picks) + " |")
if hf and fused:
    ours = {r["batch"]: r for r in fused["results"] if r["prompt_len"] == min(x["prompt_len"] for x in fused["results"])}
    print("\n| batch | transformers compiled tok/s (generate 128 in / 128 new) | llama-serve decode tok/s (llama-bench) | ratio |")
    print("|---:|---:|---:|---:|")
    for r in hf["results"]:
        o = ours.get(r["batch"])
        print(f"| {r['batch']} | {r['decode_tok_s']:.1f} | {o['decode_tok_s']:.1f} | {o['decode_tok_s'] / r['decode_tok_s']:.2f}x |" if o else f"| {r['batch']} | {r['decode_tok_s']:.1f} | - | - |")
    print(f"transformers prefill of one 512-token prompt: {hf['prefill_512_tok_s']:.0f} tok/s")
import glob
for path in sorted(glob.glob(os.path.join(out, "alt-*-attention.json"))):
    name = os.path.basename(path)[: -len("-attention.json")]
    alt_att, alt_bench = load(os.path.basename(path)), load(f"{name}-bench.json")
    if att and alt_att:
        ref = {r["case"]: r["us"] for r in att["results"]}
        print(f"\n| attention case | reference µs | {name} µs | {name} / reference |")
        print("|---|---:|---:|---:|")
        for r in alt_att["results"]:
            if r["case"] in ref:
                print(f"| {r['case']} | {ref[r['case']]:.1f} | {r['us']:.1f} | {r['us'] / ref[r['case']]:.2f} |")
    splits = {p.rsplit("-split-", 1)[1][: -len(".json")]: maybe(os.path.basename(p)) for p in sorted(glob.glob(os.path.join(out, f"{name}-split-*.json")))}
    splits = {k: {r["case"]: r["us"] for r in v["results"]} for k, v in splits.items() if v}
    if splits:
        cases = list(next(iter(splits.values())))
        print(f"\n{name} decode attention µs by LLAMA_ATTN_SPLIT (keys per split, split below this many blocks; 0,0 = off):")
        print("| setting | " + " | ".join(cases) + " |")
        print("|---|" + "---:|" * len(cases))
        for k, v in splits.items():
            print(f"| {k} | " + " | ".join(f"{v[c]:.1f}" if c in v else "-" for c in cases) + " |")
    for mine, theirs, how in ((fused, alt_bench, ""), (graphs, maybe(f"{name}-bench-graphs.json"), ", CUDA graphs")):
        if not (mine and theirs):
            continue
        ref = {(r["batch"], r["prompt_len"]): r["decode_tok_s"] for r in mine["results"]}
        print(f"\n| decode batch{how} | prompt | reference tok/s | {name} tok/s | {name} / reference |")
        print("|---:|---:|---:|---:|---:|")
        for r in theirs["results"]:
            k = (r["batch"], r["prompt_len"])
            if k in ref:
                print(f"| {r['batch']} | {r['prompt_len']} | {ref[k]:.1f} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / ref[k]:.3f} |")
if engine:
    print("\n| engine concurrency | output tok/s | decode tok/s (decode-only steps) | TTFT p50 ms | TTFT p99 ms | ms/step | overhead % | sent during step ms | preemptions | KV blocks used after / total |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in engine["results"] + [dict(r, concurrency=f"{r['concurrency']} sampled") for r in (sampled or {}).get("results", [])] \
            + [dict(r, concurrency=f"{r['concurrency']} graphs ({r.get('graph_steps', 0)} steps replayed)") for r in (engine_graphs or {}).get("results", [])] \
            + [dict(r, concurrency=f"{r['concurrency']} --overlap off") for r in (no_overlap or {}).get("results", [])] \
            + [dict(r, concurrency=f"{r['concurrency']} simulated device, overlap {o}") for o, run in simulated.items() for r in (run or {}).get("results", [])]:
        print(f"| {r['concurrency']} | {r['output_tok_s']:.1f} | {r.get('decode_tok_s', float('nan')):.1f} | {r['ttft_ms_p50']:.0f} | {r['ttft_ms_p99']:.0f} | {r['ms_per_step']:.2f} | {r['engine_overhead_pct']:.2f} | {r.get('sent_during_step_ms_per_step', 0):.2f} | {r['preemptions']} | {r['kv_blocks_used_after']} / {r['kv_blocks_total']} |")
    if fused:
        shortest = min(r["prompt_len"] for r in fused["results"])
        b = {r["batch"]: r for r in fused["results"] if r["prompt_len"] == shortest}
        top = max(b)
        # Graphs against graphs: the engine with graphs over the bench with graphs.
        bg = {r["batch"]: r for r in (graphs or {}).get("results", [])}
        runs = [(r, "") for r in engine["results"]] \
            + [(dict(r, graphs=True), " with CUDA graphs") for r in (engine_graphs or {}).get("results", [])] \
            + [(r, " with --overlap off") for r in (no_overlap or {}).get("results", [])]
        for r, label in runs:
            ref = bg.get(top, b[top]) if r.get("graphs") else b[top]
            if r["concurrency"] == top:
                print(f"\nengine{label} at {top} concurrent = {100 * r['output_tok_s'] / ref['decode_tok_s']:.0f}% of the bench's batch-{top} decode{' with graphs' if r.get('graphs') and top in bg else ''} (whole run, prefill included); "
                      f"its decode-only steps = {100 * r.get('decode_tok_s', 0) / ref['decode_tok_s']:.0f}%")
PY
# The device tool brings back only a few files: every log and JSON in one archive.
tar -C "$OUT" -czf /tmp/gpu-run-logs.tgz . && find "$OUT" -mindepth 1 -delete && mv /tmp/gpu-run-logs.tgz "$OUT/logs.tgz"
exit $status
