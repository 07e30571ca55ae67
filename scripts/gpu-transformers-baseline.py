#!/usr/bin/env python3
"""The comparison point of issue 5, re-measured on the GPU machine in the same
run as llama-serve: Hugging Face transformers `generate` with a static KV
cache and a compiled forward, on a random Llama-2-7B shape in bf16, greedy,
128-token prompts and 128 new tokens (the recipe of ../shared/CUDA.md).

  gpu-transformers-baseline.py BATCHES [--json]      e.g. 1,64

Prints one line per batch (decode tok/s = new tokens / generate time, and the
prefill time of one 512-token prompt) and, with --json, one JSON object last.
Uses the GPU machine's own PyTorch and transformers; nothing to install.
"""
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PROMPT, NEW = 128, 128


def build():
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.eval()
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    return model


@torch.inference_mode()
def generate_tok_s(model, batch):
    ids = torch.randint(100, 32000, (batch, PROMPT), device="cuda")
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    # The first two calls compile and capture the graphs for this shape.
    for _ in range(2):
        model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    new = (out.shape[1] - PROMPT) * batch
    return new / secs, secs


@torch.inference_mode()
def prefill_tok_s(model, length=512):
    ids = torch.randint(100, 32000, (1, length), device="cuda")
    # Eager forward of the whole prompt (what a server's prefill is); the
    # compiled forward is shaped for the static cache's decode steps.
    forward = getattr(model.forward, "_torchdynamo_orig_callable", model.forward)
    for _ in range(2):
        forward(ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward(ids)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return length / secs, secs


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    batches = [int(b) for b in sys.argv[1].split(",")]
    model = build()
    rows = []
    for b in batches:
        tok_s, secs = generate_tok_s(model, b)
        print(f"transformers static cache, compiled: batch {b}: {tok_s:.1f} tok/s ({secs:.2f} s for {NEW} new tokens)", flush=True)
        rows.append({"batch": b, "decode_tok_s": tok_s, "secs": secs})
    p_tok_s, p_secs = prefill_tok_s(model)
    print(f"transformers prefill of one 512-token prompt: {p_tok_s:.0f} tok/s ({p_secs * 1000:.1f} ms)", flush=True)
    if "--json" in sys.argv:
        print(json.dumps({
            "torch": torch.__version__,
            "results": rows,
            "prefill_512_tok_s": p_tok_s,
        }))


if __name__ == "__main__":
    main()
