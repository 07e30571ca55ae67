#!/usr/bin/env bash
# Runs the carried CUDA build on the GPU machine: benchmarks and checks in one
# pass, full logs under $OUT, a short table printed last.
#
# Here (build machine):
#   bash ../shared/tools/setup-cuda-build-env.sh && source /opt/cuda13-pip/env.sh
#   cargo build --release --features cuda -p llama-server -p llama-model --target-dir target/cuda
#   bash scripts/gpu-run.sh --pack          # strips + xz-compresses into target/gpu-carry/
# There (device tool, carrying target/gpu-carry):
#   bash scripts/gpu-run.sh
# Dry run on a CPU machine (same steps, CPU device, tiny shapes):
#   bash scripts/gpu-run.sh --dry-run
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-carry
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"

if [ "${1:-}" = "--pack" ]; then
  mkdir -p "$CARRY"
  for bin in llama-bench engine-bench; do
    [ -x "target/cuda/release/$bin" ] || continue
    cp "target/cuda/release/$bin" "$CARRY/$bin" && strip "$CARRY/$bin" && xz -T2 -9e -f "$CARRY/$bin"
  done
  # The parity tests, built with: cargo test --release --features cuda -p llama-model --test reference --no-run --target-dir target/cuda
  test_bin=$(ls -t target/cuda/release/deps/reference-* 2>/dev/null | grep -v '\.d$' | head -n 1)
  if [ -n "$test_bin" ]; then
    cp "$test_bin" "$CARRY/reference" && strip "$CARRY/reference" && xz -T2 -9e -f "$CARRY/reference"
  fi
  ls -la "$CARRY"
  exit 0
fi

DEVICE=cuda; DTYPE=bf16; SHAPE=7b; BATCHES=1,8,32,64; PROMPTS=128,512
if [ "${1:-}" = "--dry-run" ]; then
  DEVICE=cpu; DTYPE=f32; SHAPE=tiny; BATCHES=1,8; PROMPTS=16
  BIN=target/release
else
  BIN=/tmp/llama-bin
  mkdir -p "$BIN"
  for f in "$CARRY"/*.xz; do xz -dc "$f" > "$BIN/$(basename "$f" .xz)" && chmod +x "$BIN/$(basename "$f" .xz)"; done
  NV=$(python3 -c 'import nvidia, os, glob; print(":".join(sorted({os.path.dirname(p) for r in nvidia.__path__ for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})))')
  export LD_LIBRARY_PATH="$NV:${LD_LIBRARY_PATH:-}"
  export CUDA_CACHE_PATH=/tmp/nv-compute-cache
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
fi

status=0
if [ -x "$BIN/reference" ]; then
  echo "== parity: tiny fixture on $DEVICE (f32, reference greedy ids and logits) =="
  LLAMA_TEST_DEVICE="$DEVICE" LLAMA_REPO_ROOT="$PWD" timeout 300 "$BIN/reference" --test-threads 1 \
    > "$OUT/parity.log" 2>&1 || status=1
  grep -E "^test |test result" "$OUT/parity.log"
fi
echo "== bench: $SHAPE $DTYPE on $DEVICE =="
timeout 420 "$BIN/llama-bench" --random-weights "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --batch-sizes "$BATCHES" --prompt-len "$PROMPTS" --gen 32 --json \
  > "$OUT/bench.json" 2> "$OUT/bench.log" || status=1

python3 - "$OUT/bench.json" <<'PY' || status=1
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{d['shape']} {d['dtype']} on {d['device']}, peak RSS {d['peak_rss_bytes']/2**20:.0f} MiB")
print("| batch | prompt_len | prefill tok/s | decode tok/s | ms/step |")
for r in d["results"]:
    print(f"| {r['batch']} | {r['prompt_len']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['ms_per_step']:.2f} |")
PY
exit $status
