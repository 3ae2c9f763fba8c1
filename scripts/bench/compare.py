#!/usr/bin/env python3
"""graft against its anchors on this machine, side by side, alternating runs.

The anchors are installed outside the repository and found through the environment; nothing of
theirs is part of graft:

  LLAMA_CPP_BIN   a directory with llama.cpp's `llama-bench` and `llama-server` (built from source)
  PEFT_PYTHON     a Python with torch, transformers and peft (scripts/reference/requirements.txt)

Sections (all by default; pick with --only):
  decode    single-stream decode tokens/s: `graft-serve generate --ignore-eos` vs `llama-bench -p 0`
  serve     8 concurrent streams on 8 different adapters: `graft-serve bench` against graft-serve
            and against llama-server (same client; llama-server gets its adapters as --lora files
            and requests name them by id)
  adapters  --adapters (10,000) adapters on disk, a memory budget for ~50, Zipf popularity, vs one
            adapter; start-up to ready; the adapter read added to a cold request's first token
            (server-timing); how soon the watcher sees a new and a changed adapter (file events
            and --watch-poll); POST-load timings. (Registry memory per indexed adapter is
            counted by a test: cargo test -p graft-serve --lib indexed -- --nocapture.)
  startup   process start to answering /health, for both servers
  train     `graft-train bench configs/bench.toml` (QLoRA on Q4_1, NF4, LoRA on f32) vs PEFT LoRA
            on the f32 base on the same steps, data and initial adapter
  train_chat `graft-train bench configs/bench-chat.toml` (short chat examples, micro-batch 8,
            assistant-only loss; LoRA on f32 and QLoRA on Q4_1) vs PEFT LoRA on the same batches

Every figure is a median over --rounds alternating runs with the range; ratios are graft/anchor.
Results are printed and written as JSON to --out (default runs/bench/compare-<time>.json).
Uses the release binaries in target/release (build them first: cargo build --release).
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release"
CACHE = Path(os.environ.get("GRAFT_CACHE", Path.home() / ".cache" / "graft"))
MODEL = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_F32 = CACHE / "models" / "SmolLM2-135M-Instruct-f32-sharded"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, stdout_only=False, **kw):
    """Runs `cmd` and returns its stdout and stderr (or stdout alone)."""
    log("$", " ".join(str(c) for c in cmd))
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr[-3000:]}")
    return r.stdout if stdout_only else r.stdout + r.stderr


def med(xs):
    xs = [x for x in xs if x is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


def ratio(a, b):
    return a["median"] / b["median"] if a and b and b["median"] else None


def anchor(name):
    d = os.environ.get("LLAMA_CPP_BIN")
    if not d or not (Path(d) / name).exists():
        return None
    return Path(d) / name


def wait_ready(url, proc, timeout=900):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except Exception:
            time.sleep(0.01)
    raise SystemExit(f"{url} not ready after {timeout}s")


class Server:
    """A server process on a port, stopped on exit."""

    def __init__(self, cmd, port):
        self.url = f"http://127.0.0.1:{port}"
        log("$", " ".join(map(str, cmd)))
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ready_secs = wait_ready(self.url, self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench(url, models, args, extra=(), requests=None):
    cmd = [BIN / "graft-serve", "bench", "--url", url, "--clients", args.clients, "--requests", requests or args.requests,
           "--max-tokens", args.max_tokens, "--ignore-eos", *extra]
    if models:
        cmd += ["--models", ",".join(models)]
    out = run(cmd)
    m = re.search(r"throughput: ([\d.]+) generated tokens/s", out)
    ok = re.search(r"requests: (\d+) ok, (\d+) failed", out)
    if not m or not ok or int(ok.group(2)) > 0:
        raise SystemExit(f"bench failed:\n{out}")
    ttft = re.search(r"time to first token: p50 ([\d.]+) ms", out)
    return float(m.group(1)), float(ttft.group(1)) if ttft else None, out


# --- sections ---------------------------------------------------------------------------------

def decode(args, res):
    tokens = 128
    g, q, l = [], [], []
    lb = anchor("llama-bench")
    for _ in range(args.rounds):
        for acts, into in [("f32", g), ("q8", q)]:
            out = run([BIN / "graft-serve", "generate", "--model", MODEL, "--prompt", "Once upon a time",
                       "--max-tokens", tokens + 1, "--temperature", 0, "--ignore-eos", "--activations", acts])
            m = re.search(r"decode: \d+ tokens in [\d.]+s \(([\d.]+) tokens/s", out)
            into.append(float(m.group(1)))
        if lb:
            out = run([lb, "-m", MODEL, "-t", args.threads, "-p", 0, "-n", tokens, "-r", 1, "-o", "json"])
            l.append(json.loads(out[out.index("["):])[0]["avg_ts"])
    bw = run([BIN / "graft-serve", "bench", "--bandwidth"])
    gbs = float(re.search(r"([\d.]+) GB/s", bw).group(1))
    weights = MODEL.stat().st_size
    res["decode"] = {
        "settings": f"greedy, {tokens} tokens after a 4-token prompt, {args.threads} threads, {MODEL.name}; "
                    "graft with f32 activations (default) and --activations q8",
        "graft_tokens_per_s": med(g), "graft_q8_tokens_per_s": med(q), "llama_cpp_tokens_per_s": med(l),
        "ratio": ratio(med(g), med(l)), "q8_ratio": ratio(med(q), med(l)),
        "machine_read_bandwidth_gbs": gbs,
        "graft_weight_traffic_gbs": med(g)["median"] * weights / 1e9,
        "graft_q8_weight_traffic_gbs": med(q)["median"] * weights / 1e9,
        "llama_cpp_weight_traffic_gbs": med(l)["median"] * weights / 1e9 if l else None,
    }


def generate_tps(prompt, tokens, extra=()):
    """graft's decode tokens/s for one greedy `generate` run."""
    out = run([BIN / "graft-serve", "generate", "--model", MODEL, "--prompt", prompt,
               "--max-tokens", tokens + 1, "--temperature", 0, "--ignore-eos", *extra])
    return float(re.search(r"decode: \d+ tokens in [\d.]+s \(([\d.]+) tokens/s", out).group(1))


def adapter_decode(args, res):
    """Single-stream decode with an unmerged r=16 all-linear adapter (f32 and bf16 storage)
    against none, alternating in each round."""
    peft, _ = ensure_adapter(args, args.work)
    none, f32, bf16 = [], [], []
    for _ in range(args.rounds):
        none.append(generate_tps("Once upon a time", 128))
        f32.append(generate_tps("Once upon a time", 128, ["--adapter", peft]))
        bf16.append(generate_tps("Once upon a time", 128, ["--adapter", peft, "--adapter-dtype", "bf16"]))
    res["adapter_decode"] = {
        "settings": f"greedy, 128 tokens after a 4-token prompt, {args.threads} threads, {MODEL.name}, "
                    "f32 activations; adapter r=16 all linear (graft-train bench, one step)",
        "none_tokens_per_s": med(none), "f32_adapter_tokens_per_s": med(f32),
        "bf16_adapter_tokens_per_s": med(bf16),
        "ratio": ratio(med(f32), med(none)), "bf16_ratio": ratio(med(bf16), med(none)),
    }


def context(args, res):
    """Decode after a ~2,000-token prompt against decode after a 4-token one, alternating."""
    words = ("the of and to in is was for on that with as by at from his her it an were are which this "
             "be or has had not but their its they one also first new after who been have more two").split()
    long_prompt = " ".join(words[(i * 7919) % len(words)] for i in range(2000))
    short, long = [], []
    for _ in range(args.rounds):
        short.append(generate_tps("Once upon a time", 64))
        long.append(generate_tps(long_prompt, 64))
    res["context"] = {
        "settings": f"greedy, 64 tokens after a 4-token and after a ~2,000-token prompt, {args.threads} threads, "
                    f"{MODEL.name}, f32 activations",
        "short_tokens_per_s": med(short), "long_tokens_per_s": med(long), "ratio": ratio(med(long), med(short)),
    }


def ensure_adapter(args, work):
    """A trained r=16 all-linear adapter (PEFT dir) and its GGUF-LoRA export."""
    peft = work / "adapter"
    gguf = work / "adapter.gguf"
    if not peft.exists():
        out = run([BIN / "graft-train", "bench", ROOT / "configs" / "bench.toml", "--steps", 1,
                   "--set", f"output.runs_dir={work}"])
        run_dir = Path(re.search(r"^run: (.+)$", out, re.M).group(1))
        shutil.copytree(run_dir / "adapter", peft)
    if not gguf.exists():
        run([BIN / "graft-train", "export", peft, "--gguf", gguf, "--model", MODEL])
    return peft, gguf


def serve(args, res):
    work = args.work
    peft, gguf = ensure_adapter(args, work)
    names = [f"a{i}" for i in range(8)]
    graft_cmd = [BIN / "graft-serve", "--model", MODEL, "--port", 8101, "--max-batch", 8]
    for n in names:
        graft_cmd += ["--adapter", f"{n}={peft}"]
    ls = anchor("llama-server")
    llama_cmd = None
    if ls:
        llama_cmd = [ls, "-m", MODEL, "--port", 8102, "-t", args.threads, "-np", 8, "-c", 8 * 1024,
                     "--lora-init-without-apply", "--no-webui"]
        for _ in names:
            llama_cmd += ["--lora", gguf]
    g, l, gt, lt = [], [], [], []
    for _ in range(args.rounds):
        with Server(graft_cmd, 8101) as s:
            tps, ttft, _ = bench(s.url, names, args)
            g.append(tps)
            gt.append(ttft)
        if llama_cmd:
            with Server(llama_cmd, 8102) as s:
                tps, ttft, _ = bench(s.url, [f"lora:{i}" for i in range(8)], args)
                l.append(tps)
                lt.append(ttft)
    res["serve"] = {
        "settings": f"{args.clients} clients, {args.requests} requests round robin over 8 adapters (r=16, all linear), "
                    f"{args.max_tokens} greedy tokens each (ignore_eos), {args.threads} threads",
        "graft_tokens_per_s": med(g), "llama_server_tokens_per_s": med(l), "ratio": ratio(med(g), med(l)),
        "graft_ttft_p50_ms": med(gt), "llama_server_ttft_p50_ms": med(lt),
    }


def adapter_pool(peft, work, n):
    """`n` adapters as real directories (hard links to one adapter's files: no disk per copy)."""
    pool = work / f"adapters-{n}"
    if not pool.exists():
        tmp = work / f".adapters-{n}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for i in range(n):
            d = tmp / f"z{i:05d}"
            d.mkdir()
            for f in peft.iterdir():
                os.link(f, d / f.name)
        tmp.rename(pool)
    return pool


def wait_for(url, pred, timeout=30):
    """Seconds until GET `url` answers with JSON for which `pred` holds."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if pred(json.loads(r.read())):
                    return time.perf_counter() - t0
        except Exception:
            pass
        time.sleep(0.005)
    return None


def watch_latency(url, pool, name):
    """A new adapter renamed into the pool, then its config replaced: seconds until each is seen."""
    staged = pool.parent / f".{name}.staged"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(pool / "z00000", staged)
    t0 = time.perf_counter()
    staged.rename(pool / name)
    added = wait_for(f"{url}/v1/adapters/{name}", lambda c: True)
    version = json.loads(urllib.request.urlopen(f"{url}/v1/adapters/{name}").read())["version"]
    cfg = json.loads((pool / name / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg.get("lora_alpha", 16) + 1
    (pool / name / ".cfg.tmp").write_text(json.dumps(cfg))
    t1 = time.perf_counter()
    (pool / name / ".cfg.tmp").rename(pool / name / "adapter_config.json")
    changed = wait_for(f"{url}/v1/adapters/{name}", lambda c: c["version"] != version)
    shutil.rmtree(pool / name)
    return added, changed


def adapters(args, res):
    work = args.work
    n = args.adapters
    peft, _ = ensure_adapter(args, work)
    pool = adapter_pool(peft, work, n)
    per = sum(f.stat().st_size for f in peft.iterdir())
    budget_mb = int(per * 50 * 1.05 / 1048576) + 1
    # No prefix cache here: every request of the one-adapter baseline would share its prompt's
    # cached prefix, which requests for other adapters cannot (the cache is per adapter); with
    # it this would measure prefix caching, not adapter handling.
    cmd = [BIN / "graft-serve", "--model", MODEL, "--port", 8103, "--adapters-dir", pool,
           "--adapter-memory-mb", budget_mb, "--watch-interval-ms", 1000, "--prefix-cache-tokens", 0]
    zipf, single, starts, reads = [], [], [], []
    with Server(cmd, 8103) as s:
        start = s.ready_secs
        # Fill the memory budget first: the figures are for a server in steady state, where
        # each cold read evicts (and recycles the memory of) the least recently used adapter.
        bench(s.url, None, args, ["--all-adapters", "--zipf", "1.0", "--seed", 1000], requests=160)
        for _ in range(args.rounds):
            tps, _, zout = bench(s.url, None, args, ["--all-adapters", "--zipf", "1.0", "--seed", len(zipf)])
            zipf.append(tps)
            m = re.search(r"adapter read before the first token.*?: p50 ([\d.]+) ms, p90 ([\d.]+) ms.*?\(n = (\d+)\)", zout)
            if m:
                reads.append({"p50_ms": float(m.group(1)), "p90_ms": float(m.group(2)), "n": int(m.group(3))})
            tps, _, _ = bench(s.url, ["z00000"], args)
            single.append(tps)
        # Cold reads one request at a time (uniform picks over the 10,000: nearly all cold).
        out = run([BIN / "graft-serve", "bench", "--url", s.url, "--clients", 1, "--requests", 30,
                   "--max-tokens", 1, "--all-adapters", "--zipf", 0.0, "--seed", 7, "--prompt", "Hi"])
        m = re.search(r"adapter read before the first token.*?: p50 ([\d.]+) ms, p90 ([\d.]+) ms", out)
        idle_read = {"p50_ms": float(m.group(1)), "p90_ms": float(m.group(2))} if m else None
        events_added, events_changed = watch_latency(s.url, pool, "zz-watch")
        out = run([BIN / "graft-serve", "bench", "--url", s.url, "--load-adapter", pool / "z00000", "--cold", 20,
                   "--clients", 1, "--requests", 1, "--max-tokens", 1, "--models", "z00000",
                   "--prompt", "Hi"])
    for _ in range(args.rounds):
        with Server(cmd, 8103) as s:
            starts.append(s.ready_secs)
    with Server(cmd + ["--watch-poll"], 8103) as s:
        poll_added, poll_changed = watch_latency(s.url, pool, "zz-watch")
    grab = lambda name: float(re.search(re.escape(name) + r": p50 ([\d.]+) ms", out).group(1))
    res["adapters"] = {
        "settings": f"{n} r=16 all-linear adapters on disk, memory budget {budget_mb} MiB (~50 adapters), Zipf s=1.0, "
                    f"{args.clients} clients, {args.requests} requests, {args.max_tokens} tokens, after a 160-request warm-up; "
                    "baseline: the same on one adapter; no prefix cache; watch interval 1000 ms",
        "zipf_tokens_per_s": med(zipf), "single_adapter_tokens_per_s": med(single),
        "ratio": ratio(med(zipf), med(single)),
        "server_lines": [l for l in zout.splitlines() if l.startswith("server:")],
        "start_to_ready_s": med([start] + starts),
        "cold_read_added_to_first_token_ms": reads,
        "cold_read_p50_ms": med([r["p50_ms"] for r in reads]),
        "cold_read_one_at_a_time_ms": idle_read,
        "watch_events_new_adapter_seen_s": events_added,
        "watch_events_change_seen_s": events_changed,
        "watch_poll_new_adapter_seen_s": poll_added,
        "watch_poll_change_seen_s": poll_changed,
        "post_load_request_p50_ms": grab("cold adapter: load request"),
        "post_load_to_first_token_p50_ms": grab("cold adapter: load start → first token"),
        "warm_first_token_p50_ms": grab("same adapter in memory: first token"),
    }


def startup(args, res):
    g, l = [], []
    ls = anchor("llama-server")
    for _ in range(args.rounds):
        with Server([BIN / "graft-serve", "--model", MODEL, "--port", 8104], 8104) as s:
            g.append(s.ready_secs)
        if ls:
            with Server([ls, "-m", MODEL, "--port", 8105, "-t", args.threads, "--no-webui"], 8105) as s:
                l.append(s.ready_secs)
    res["startup"] = {"settings": "process start to HTTP 200 from /health, SmolLM2-135M Q4_1 GGUF",
                      "graft_s": med(g), "llama_server_s": med(l)}


def graft_bench(args, config, quant, steps, extra=()):
    """One `graft-train bench` run: its directory and figures."""
    o = run([BIN / "graft-train", "bench", ROOT / "configs" / config, "--steps", steps,
             "--set", f"model.quantization={quant}", "--set", f"output.runs_dir={args.work / 'train'}", *extra])
    return Path(re.search(r"^run: (.+)$", o, re.M).group(1)), {
        "tokens_per_s": float(re.search(r"throughput: ([\d.]+) tokens/s", o).group(1)),
        "split": re.search(r"seconds/step \(median\): (.+)", o).group(1),
        "peak_rss_mib": float(re.search(r"peak RSS: ([\d.]+) MiB", o).group(1)),
        "losses": [float(x) for x in re.search(r"loss by step: (.+)", o).group(1).split()],
    }


def peft_bench(args, run_dir, *extra):
    """PEFT on the workload of a graft bench run (None without PEFT_PYTHON)."""
    py = os.environ.get("PEFT_PYTHON")
    if not py:
        return None
    o = run([py, ROOT / "scripts" / "bench" / "peft_train.py", "--run", run_dir, "--model", HF_F32,
             "--threads", args.threads, *extra], stdout_only=True)
    return json.loads(o.strip().splitlines()[-1])


def loss_diff(graft, peft):
    return max(abs(a - b) / abs(b) for a, b in zip(graft["losses"][:10], peft["losses"][:10]))


def train_workload(args, config, variants):
    """graft's `variants` of one bench config (quantization, `+recompute` for
    train.gradient_checkpointing), then PEFT on the f32 run's workload; the common ratios."""
    out = {}
    runs = {}
    for q in variants:
        steps = args.train_steps if q == "none" else max(3, args.train_steps // 2)
        quant, _, recompute = q.partition("+")
        extra = ["--set", "train.gradient_checkpointing=true"] if recompute else []
        runs[q], out[q] = graft_bench(args, config, quant, steps, extra)
    peft = peft_bench(args, runs["none"])
    if peft:
        out["peft_f32_lora"] = peft
        out["loss_max_rel_diff_first_10"] = loss_diff(out["none"], peft)
        out["lora_speed_ratio"] = out["none"]["tokens_per_s"] / peft["tokens_per_sec"]
        out["qlora_memory_ratio"] = out["keep"]["peak_rss_mib"] / peft["peak_rss_mib"]
    return out, runs, peft


def train(args, res):
    out, runs, peft = train_workload(args, "bench.toml", ["none", "keep", "nf4", "keep+recompute"])
    if peft:
        out["nf4_memory_ratio"] = out["nf4"]["peak_rss_mib"] / peft["peak_rss_mib"]
        out["qlora_recompute_memory_ratio"] = out["keep+recompute"]["peak_rss_mib"] / peft["peak_rss_mib"]
        # PEFT with transformers' gradient checkpointing: the like-for-like anchor of the last row
        peft_gc = peft_bench(args, runs["none"], "--steps", max(3, args.train_steps // 2), "--gradient-checkpointing")
        out["peft_f32_lora_checkpointing"] = peft_gc
        out["qlora_recompute_memory_ratio_vs_peft_checkpointing"] = (
            out["keep+recompute"]["peak_rss_mib"] / peft_gc["peak_rss_mib"])
    out["settings"] = "configs/bench.toml: r=16 alpha=32 all linear, micro-batch 4 x 256 tokens, AdamW lr 2e-4 constant, f32 compute, CPU"
    res["train"] = out


def train_chat(args, res):
    """Short chat examples: micro-batch 8 of ~100 tokens, loss on the assistant turns only."""
    out, _, _ = train_workload(args, "bench-chat.toml", ["none", "keep"])
    out["settings"] = ("configs/bench-chat.toml: r=16 alpha=32 all linear, micro-batch 8 chat examples "
                       "(~100 tokens, 3 turns), assistant-only loss, AdamW lr 2e-4 constant, f32 compute, CPU; "
                       "PEFT right-pads each micro-batch, tokens/s counts real tokens for both")
    res["train_chat"] = out


def summary(res, args):
    """One line per target of the performance issue: measured value and target."""
    rows = []

    def at(*path):
        d = res
        for k in path:
            if not isinstance(d, dict) or k not in d or d[k] is None:
                return None
            d = d[k]
        return d

    def add(name, value, target, fmt="{:.2f}"):
        rows.append(f"{name:<58} {fmt.format(value) if value is not None else 'n/a':>10}   target {target}")

    add("decode tokens/s, graft / llama.cpp (llama-bench)", at("decode", "ratio"), ">= 1.0")
    add("decode tokens/s, graft q8 / llama.cpp (llama-bench)", at("decode", "q8_ratio"), ">= 1.0")
    add("decode with an r=16 adapter / without (f32 adapter)", at("adapter_decode", "ratio"), ">= 0.85")
    add("decode with an r=16 adapter / without (--adapter-dtype bf16)", at("adapter_decode", "bf16_ratio"), ">= 0.85")
    add("decode after ~2,000 tokens / after 4", at("context", "ratio"), ">= 0.8")
    add("8 streams on 8 adapters, graft / llama-server", at("serve", "ratio"), ">= 3.0")
    add(f"{args.adapters} adapters Zipf / one adapter (graft)", at("adapters", "ratio"), ">= 0.95")
    add(f"start-up to ready with {args.adapters} adapters (s)", at("adapters", "start_to_ready_s", "median"), "<= 1.0")
    add("cold adapter read added to first token, p50 (ms), 8-stream load", at("adapters", "cold_read_p50_ms", "median"), "<= 5", "{:.1f}")
    add("cold adapter read added to first token, p50 (ms), one at a time", at("adapters", "cold_read_one_at_a_time_ms", "p50_ms"), "<= 5", "{:.1f}")
    add("watcher: change seen after (s, file events)", at("adapters", "watch_events_change_seen_s"), "<= 1.0 (interval)", "{:.3f}")
    add("watcher: change seen after (s, --watch-poll)", at("adapters", "watch_poll_change_seen_s"), "<= 1.0 (interval)", "{:.3f}")
    add("POST load request p50 (ms)", at("adapters", "post_load_request_p50_ms"), "", "{:.1f}")
    add("start-up to ready, graft (s)", at("startup", "graft_s", "median"), "<= 1.0")
    add("LoRA training tokens/s, graft / PEFT (CPU, f32)", at("train", "lora_speed_ratio"), ">= 1.5")
    add("QLoRA (Q4_1) peak RSS / PEFT f32 LoRA peak RSS", at("train", "qlora_memory_ratio"), "<= 0.35")
    add("QLoRA (Q4_1) + gradient_checkpointing peak RSS / PEFT f32 LoRA", at("train", "qlora_recompute_memory_ratio"), "<= 0.35")
    add("  same / PEFT f32 LoRA with gradient checkpointing", at("train", "qlora_recompute_memory_ratio_vs_peft_checkpointing"), "")
    add("loss, first 10 steps, max relative difference to PEFT", at("train", "loss_max_rel_diff_first_10"), "<= 0.01", "{:.2e}")
    add("short-chat LoRA training tokens/s, graft / PEFT (CPU, f32)", at("train_chat", "lora_speed_ratio"), ">= 1.5")
    add("short-chat QLoRA (Q4_1) peak RSS / PEFT f32 LoRA", at("train_chat", "qlora_memory_ratio"), "")
    add("short-chat loss, max relative difference to PEFT", at("train_chat", "loss_max_rel_diff_first_10"), "<= 0.01", "{:.2e}")
    print("\n".join(rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="decode,adapter_decode,context,serve,adapters,startup,train,train_chat")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=10000, help="adapters on disk in the adapters section")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "compare-work")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--model", type=Path, default=None,
                    help="GGUF to measure instead of SmolLM2-135M Q4_1 (e.g. scripts/fetch-model.sh "
                         "qwen2.5-coder or gemma3); the adapter sections need a model graft-train "
                         "can train on")
    args = ap.parse_args()
    global MODEL
    if args.model:
        MODEL = args.model.expanduser().resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    args.work = args.work.resolve()
    if not MODEL.exists():
        raise SystemExit(f"{MODEL} is missing: run scripts/fetch-model.sh")
    for name in ["LLAMA_CPP_BIN", "PEFT_PYTHON"]:
        if not os.environ.get(name):
            log(f"note: {name} is not set; the anchor's side of the comparison is skipped")
    res = {"machine": {"cpus": os.cpu_count(), "threads": args.threads}, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    sections = {"decode": decode, "adapter_decode": adapter_decode, "context": context, "serve": serve,
                "adapters": adapters, "startup": startup, "train": train,
                "train_chat": train_chat}
    out = args.out or ROOT / "runs" / "bench" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        sections[name](args, res)
        out.write_text(json.dumps(res, indent=1))  # what is measured so far survives a failure
        print(json.dumps({name: res[name]}, indent=1), flush=True)
    summary(res, args)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
