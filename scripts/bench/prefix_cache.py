"""Prefix caching: time to first token of a request whose ~1,000-token system prompt the
server has seen before (warm) against one it has not (cold), on a running graft-serve.

usage: python3 scripts/bench/prefix_cache.py [--url http://127.0.0.1:8000] [--model NAME] [--rounds 5]
Cold requests put a fresh nonce at the start of the system prompt so nothing can be reused;
warm ones repeat the previous cold request's system prompt with another question. Rounds
alternate; prints medians, spread (min–max) and the warm/cold ratio. Standard library only.
"""
import argparse
import json
import statistics
import time
import urllib.request
import uuid

ap = argparse.ArgumentParser()
ap.add_argument("--url", default="http://127.0.0.1:8000")
ap.add_argument("--model", default=None)
ap.add_argument("--rounds", type=int, default=5)
args = ap.parse_args()
model = args.model or json.load(urllib.request.urlopen(args.url + "/v1/models"))["data"][0]["id"]
policy = ("Answer as a careful assistant for a shipping company. Cite the policy section, keep a "
          "polite tone, never promise delivery dates, and escalate damaged parcels to a human. ")


def ttft(system, question):
    body = {"model": model, "stream": True, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    req = urllib.request.Request(args.url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"]
                if delta and delta[0]["delta"].get("content"):
                    return time.perf_counter() - t0
    return time.perf_counter() - t0


def tokens(system):
    body = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": "x"}]}
    req = urllib.request.Request(args.url + "/tokenize", json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))["count"]


cold, warm = [], []
for r in range(args.rounds + 1):
    system = f"[{uuid.uuid4()}] " + policy * 30
    c = ttft(system, "Where is my parcel?")
    w = ttft(system, "Can I change the delivery address?")
    if r > 0:  # the first round warms the server up
        cold.append(c)
        warm.append(w)
mc, mw = statistics.median(cold), statistics.median(warm)
print(f"model {model}, system prompt {tokens(system)} tokens, {args.rounds} alternating rounds")
print(f"cold TTFT: {mc * 1e3:.0f} ms (min {min(cold) * 1e3:.0f}, max {max(cold) * 1e3:.0f})")
print(f"warm TTFT: {mw * 1e3:.0f} ms (min {min(warm) * 1e3:.0f}, max {max(warm) * 1e3:.0f})")
print(f"warm/cold: {mw / mc:.2f}")
