"""Constrained-decoding overhead: decode tokens/s of the same prompts with and without a JSON
schema, against a running graft-serve (one client, so each figure is one stream's speed).

usage: python3 scripts/bench/structured.py [--url http://127.0.0.1:8000] [--model NAME] [--rounds 5]
Alternates unconstrained and constrained rounds and prints the median tokens/s of each with the
spread (min–max) and the ratio. Standard library only. It measures; it never asserts.
"""
import argparse
import json
import statistics
import time
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--url", default="http://127.0.0.1:8000")
ap.add_argument("--model", default=None)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--max-tokens", type=int, default=64)
args = ap.parse_args()


def post(path, body):
    req = urllib.request.Request(args.url + path, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


model = args.model or json.load(urllib.request.urlopen(args.url + "/v1/models"))["data"][0]["id"]
# A schema whose answer runs as long as the unconstrained one: one long string field.
schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400, "maxLength": 2000}},
          "required": ["story"], "additionalProperties": False}
prompts = ["Write a short story about a lighthouse keeper.", "Describe a journey across the desert.",
           "Tell me about a robot who learns to paint."]


def rate(constrained):
    tokens, secs = 0, 0.0
    for p in prompts:
        body = {"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": args.max_tokens,
                "temperature": 0}
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        t0 = time.perf_counter()
        r = post("/v1/chat/completions", body)
        secs += time.perf_counter() - t0
        tokens += r["usage"]["completion_tokens"]
    return tokens / secs


plain, constrained = [], []
rate(False)  # warm-up
for _ in range(args.rounds):
    plain.append(rate(False))
    constrained.append(rate(True))
mp, mc = statistics.median(plain), statistics.median(constrained)
print(f"model {model}, {len(prompts)} prompts x {args.max_tokens} tokens, {args.rounds} alternating rounds")
print(f"unconstrained: {mp:.1f} tok/s (min {min(plain):.1f}, max {max(plain):.1f})")
print(f"json_schema:   {mc:.1f} tok/s (min {min(constrained):.1f}, max {max(constrained):.1f})")
print(f"ratio constrained/unconstrained: {mc / mp:.2f}")
