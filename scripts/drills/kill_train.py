#!/usr/bin/env python3
"""kill -9 drill for graft-train: SIGKILL a run at random moments, resume it, and check that it
ends with the same adapter as an uninterrupted run and that no checkpoint is ever half-written.

    python3 scripts/drills/kill_train.py [--trials 20] [--seed 1]

Half the trials kill at a uniformly random moment of the run; the other half kill as soon as a
checkpoint's temporary directory appears (mid-write). After each kill every checkpoint the run
lists must load (trainer state parses, optimizer and adapter safetensors complete), then
`graft-train resume` must finish with an adapter within 1e-6 of the uninterrupted run's and a
metrics log with each step once. Prints one line per trial and a summary. Needs the release
binary (`cargo build --release -p graft-train`) and the SmolLM2 model (scripts/fetch-model.sh).
"""

import argparse
import glob
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from array import array

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release", "graft-train")
STEPS = 8


def model_path():
    """The SmolLM2 GGUF where graft's cache keeps it (core/src/cache.rs)."""
    cache = os.environ.get("GRAFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graft")
    path = os.path.join(cache, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        sys.exit(f"{path} is missing: run scripts/fetch-model.sh")
    if not os.access(BIN, os.X_OK):
        sys.exit(f"{BIN} is missing: cargo build --release -p graft-train")
    return path


def write_config(d, model):
    path = os.path.join(d, "drill.toml")
    with open(path, "w") as f:
        f.write(f"""[model]
base = "{model}"

[lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj", "down_proj"]

[data]
train = "{ROOT}/configs/data/capitals.jsonl"
max_seq_len = 128
eval_fraction = 0.1

[train]
micro_batch_size = 2
learning_rate = 1e-3
lr_scheduler = "linear"
max_steps = {STEPS}
save_every = 1
keep_last_checkpoints = 3
eval_samples = 0

[output]
runs_dir = "runs"
""")
    return path


def read_safetensors(path):
    """Tensor name -> f32 values; raises on any truncation or inconsistency."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        if b > len(body):
            raise ValueError(f"{path}: tensor {name} ends at {b}, file data is {len(body)}")
        end = max(end, b)
        if info["dtype"] == "F32":
            out[name] = array("f", body[a:b])
    if end != len(body):
        raise ValueError(f"{path}: data region {len(body)} bytes, tensors cover {end}")
    return out


def check_checkpoints(run):
    """Every listed checkpoint loads; returns their names and leftover temporaries."""
    d = os.path.join(run, "checkpoints")
    if not os.path.isdir(d):
        return [], []
    names = sorted(os.listdir(d))
    done = [n for n in names if n.startswith("step-")]
    temps = [n for n in names if not n.startswith("step-")]
    for n in done:
        c = os.path.join(d, n)
        if not os.path.isfile(os.path.join(c, "trainer_state.json")):
            continue  # not listed by graft (an older checkpoint mid-prune)
        json.load(open(os.path.join(c, "trainer_state.json")))
        read_safetensors(os.path.join(c, "optimizer.safetensors"))
        read_safetensors(os.path.join(c, "adapter", "adapter_model.safetensors"))
        json.load(open(os.path.join(c, "adapter", "adapter_config.json")))
    return done, temps


def run_dir(d):
    runs = glob.glob(os.path.join(d, "runs", "*"))
    return runs[0] if runs else None


def max_diff(a, b):
    ta = read_safetensors(os.path.join(a, "adapter_model.safetensors"))
    tb = read_safetensors(os.path.join(b, "adapter_model.safetensors"))
    assert ta.keys() == tb.keys(), "adapter tensor names differ"
    return max(max(abs(x - y) for x, y in zip(ta[k], tb[k])) for k in ta)


def logged_steps(run):
    steps = []
    for line in open(os.path.join(run, "metrics.jsonl")):
        v = json.loads(line)
        if "loss" in v:
            steps.append(v["step"])
    return steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    model = model_path()
    env = dict(os.environ, RUST_LOG="warn")

    ref = tempfile.mkdtemp(prefix="graft-drill-ref-")
    cfg = write_config(ref, model)
    p = subprocess.Popen([BIN, cfg], cwd=ref, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    while run_dir(ref) is None and p.poll() is None:
        time.sleep(0.001)
    t0 = time.monotonic()
    if p.wait() != 0:
        sys.exit("the uninterrupted run failed")
    # kill moments are drawn over the training part (from the run directory's creation)
    wall = time.monotonic() - t0
    ref_adapter = os.path.join(run_dir(ref), "adapter")
    print(f"uninterrupted run: {STEPS} steps, checkpoint every step, {wall:.1f} s of training")

    results = []
    for trial in range(args.trials):
        d = tempfile.mkdtemp(prefix="graft-drill-")
        cfg = write_config(d, model)
        mode = "random" if trial % 2 == 0 else "mid-write"
        p = subprocess.Popen([BIN, cfg], cwd=d, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        # wait for the run directory (before it, there is nothing to resume: the user re-runs)
        while run_dir(d) is None or not os.path.isfile(os.path.join(run_dir(d), "config.toml")):
            time.sleep(0.001)
        run = run_dir(d)
        t_start = time.monotonic()
        if mode == "random":
            time.sleep(rng.uniform(0, wall))
        else:
            target = rng.randint(1, STEPS)
            ck = os.path.join(run, "checkpoints", f".step-{target:06}.tmp")
            while not os.path.exists(ck) and p.poll() is None:
                time.sleep(0.0002)
        at = time.monotonic() - t_start
        finished = p.poll() is not None
        p.send_signal(signal.SIGKILL)
        p.wait()
        done, temps = check_checkpoints(run)
        last = done[-1] if done else "none"
        r = subprocess.run([BIN, "resume", run], cwd=d, env=env, capture_output=True, text=True)
        ok = r.returncode == 0
        diff = max_diff(ref_adapter, os.path.join(run, "adapter")) if ok else float("inf")
        steps_ok = ok and logged_steps(run) == list(range(1, STEPS + 1))
        passed = ok and diff <= 1e-6 and steps_ok
        results.append((passed, bool(temps), finished))
        print(f"trial {trial + 1:2}: {mode:9} kill at {at:5.2f} s, last checkpoint {last}, "
              f"leftover temporaries {temps or '-'}{' (run had ended)' if finished else ''}; "
              f"resume {'ok' if ok else 'FAILED: ' + r.stderr[-300:]}, max |d| {diff:.2e}, "
              f"steps logged once: {steps_ok} -> {'PASS' if passed else 'FAIL'}")
    n = len(results)
    passed = sum(r[0] for r in results)
    mid = sum(r[1] for r in results)
    ended = sum(r[2] for r in results)
    print(f"\n{passed}/{n} resumed runs match the uninterrupted adapter (<= 1e-6) with every step "
          f"logged once; {n - ended} kills landed during training, {mid} of them while a "
          f"checkpoint was being written ({ended} after the run had ended); every listed "
          f"checkpoint loaded after every kill")
    sys.exit(0 if passed == n else 1)


if __name__ == "__main__":
    main()
