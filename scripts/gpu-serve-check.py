#!/usr/bin/env python3
"""Talks to running llama-serve instances over HTTP as a client would, with
the standard library only (the GPU machine has no openai package).

  gpu-serve-check.py parity URL_A URL_B   same greedy answers from two servers
                                          (CUDA against CPU), streamed and not,
                                          and seeded draws repeat
  gpu-serve-check.py load URL N TOKENS    N concurrent streamed chats of TOKENS
                                          tokens each; prints tokens/s

Exits non-zero on any failure, after printing what failed.
"""
import json
import sys
import threading
import time
import urllib.error
import urllib.request


def wait_ready(base, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"{base}: not ready after {timeout}s")


def post(base, path, body, stream=False):
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    r = urllib.request.urlopen(req, timeout=300)
    if not stream:
        with r:
            return json.loads(r.read())
    return r


def model_id(base):
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def chat(base, model, content, **params):
    body = {"model": model, "messages": [{"role": "user", "content": content}], **params}
    return post(base, "/v1/chat/completions", body)


def stream_chat(base, model, content, **params):
    """The streamed answer's text, its completion tokens (from the usage
    chunk), and whether [DONE] came."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
        **params,
    }
    text, tokens, done = [], 0, False
    with post(base, "/v1/chat/completions", body, stream=True) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    text.append(choice["delta"]["content"])
    return "".join(text), tokens, done


def parity(a, b):
    wait_ready(a)
    wait_ready(b)
    ma, mb = model_id(a), model_id(b)
    failures = []
    prompts = ["Tell me about llamas.", "Write a haiku about GPUs.", "What is 2 + 2?"]
    for p in prompts:
        ra = chat(a, ma, p, max_tokens=32, temperature=0)
        rb = chat(b, mb, p, max_tokens=32, temperature=0)
        ta, tb = ra["choices"][0]["message"]["content"], rb["choices"][0]["message"]["content"]
        same = ta == tb
        print(f"greedy {p!r}: {ra['usage']['completion_tokens']} tokens, same on both: {same}")
        if not same:
            failures.append(f"greedy answers differ for {p!r}: {ta!r} vs {tb!r}")
        st, tokens, done = stream_chat(a, ma, p, max_tokens=32, temperature=0)
        if st != ta or not done or tokens != ra["usage"]["completion_tokens"]:
            failures.append(f"stream differs for {p!r} ({tokens} tokens, [DONE] {done}): {st!r} vs {ta!r}")
    seeded = [
        chat(a, ma, "Name a colour.", max_tokens=24, temperature=0.8, top_p=0.9, seed=7)["choices"][0]["message"]["content"]
        for _ in range(2)
    ]
    print(f"seeded draws repeat: {seeded[0] == seeded[1]}")
    if seeded[0] != seeded[1]:
        failures.append(f"seeded draws differ: {seeded}")
    n2 = chat(a, ma, "Hi", max_tokens=8, temperature=1.0, n=2)
    if len(n2["choices"]) != 2:
        failures.append(f"n=2 gave {len(n2['choices'])} choices")
    # Bad input gets an OpenAI-style error and the server keeps serving.
    try:
        chat(a, ma, "Hi", max_tokens=-1)
        failures.append("max_tokens=-1 was accepted")
    except urllib.error.HTTPError as e:
        err = json.loads(e.read()).get("error", {})
        print(f"max_tokens=-1: HTTP {e.code}, type {err.get('type')!r}")
        if e.code != 400 or "message" not in err:
            failures.append(f"max_tokens=-1: HTTP {e.code} {err}")
    chat(a, ma, "Still there?", max_tokens=4, temperature=0)
    return failures


def load(base, n, tokens):
    wait_ready(base)
    m = model_id(base)
    results, lock = [], threading.Lock()

    def one(i):
        t0 = time.time()
        try:
            _, got, done = stream_chat(
                base, m, f"Request {i}: tell me a long story.", max_tokens=tokens, temperature=0, ignore_eos=True
            )
            ok = done and got == tokens
        except Exception as e:  # noqa: BLE001 - report every failure, keep counting
            ok, got = False, 0
            print(f"request {i}: {e}")
        with lock:
            results.append((ok, got, time.time() - t0))

    t0 = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.time() - t0
    ok = sum(1 for r in results if r[0])
    got = sum(r[1] for r in results)
    print(f"{n} concurrent streams of {tokens} tokens over HTTP: {ok}/{n} complete, "
          f"{got} tokens in {secs:.2f} s = {got / secs:.0f} tok/s")
    return [] if ok == n else [f"{n - ok} of {n} streams failed"]


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "parity":
        failures = parity(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 5 and sys.argv[1] == "load":
        failures = load(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
