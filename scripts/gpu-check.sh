#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU (driver and CUDA's NVRTC library; burn-cuda
# compiles its kernels at run time). Prepared to run unattended in one go, printing figures:
#   1. parity: the GPU tests of the three crates (every family's tiny model against transformers,
#      cached decoding and ragged batches, two threads on one device, a QLoRA run against the
#      CPU's losses, a served request against the CPU server's) and SmolLM2-135M's logits on the
#      GPU against transformers';
#   2. QLoRA training: `graft-train bench configs/bench.toml` on the Q4_1 base and on NF4, with
#      f32 products and on NF4 with bf16 ones (`train.compute_dtype`; f16 on wgpu), tokens/s
#      and peak device memory, and the same workload in PEFT + bitsandbytes (NF4, double
#      quantization, f32 and bf16 compute) where torch, peft and bitsandbytes import with CUDA
#      ($PEFT_PYTHON);
#   3. decode: `graft-serve generate` (128 greedy tokens) on the GPU and on the CPU;
#   4. serving: 8 concurrent streams on 8 different adapters (`graft-serve bench`), on the GPU.
# Exits non-zero when a parity check fails; the figures end in one summary block.
#
#   scripts/gpu-check.sh                        # CUDA (cuda:0)
#   GRAFT_GPU=wgpu scripts/gpu-check.sh --quick # the same steps on the wgpu backend, shortened
#                                               # (a dry run of this script on a software device)
# The build needs no GPU: run `GRAFT_GPU_BUILD_ONLY=1 scripts/gpu-check.sh` first where the
# GPU time is short, and carry target/ over.
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=${GRAFT_GPU:-cuda}
case "$gpu" in cuda | wgpu) ;; *) echo "GRAFT_GPU must be cuda or wgpu, not '$gpu'" >&2; exit 2 ;; esac
quick=0
[ "${1:-}" = "--quick" ] && quick=1
steps=10 tokens=128 requests=32 shorter=()
[ $quick = 1 ] && steps=3 tokens=16 requests=8 shorter=(--set data.max_seq_len=32 --set train.micro_batch_size=1)
features="graft-core/$gpu,graft-serve/$gpu,graft-train/$gpu"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

cargo build --release -p graft-serve -p graft-train --features "graft-serve/$gpu,graft-train/$gpu"
cargo test --release -p graft-core -p graft-serve -p graft-train --features "$features" --test it --no-run
[ -n "${GRAFT_GPU_BUILD_ONLY:-}" ] && exit 0

scripts/prepare-test-models.sh >/dev/null
cache=${GRAFT_CACHE:-$HOME/.cache/graft}
model=$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
work=$(mktemp -d /tmp/graft-gpu-check.XXXX)
bin=target/release
summary=()
note() { echo "$*"; summary+=("$*"); }

# Peak device memory (MiB) while "$@" runs, from nvidia-smi's samples (none without it).
peak_file=$work/peak
with_peak() {
    if ! command -v nvidia-smi >/dev/null; then
        echo "n/a" >"$peak_file"
        "$@"
        return
    fi
    local base
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0)
    (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0; sleep 0.2; done) \
        >"$work/mem" 2>/dev/null &
    local sampler=$!
    local rc=0
    "$@" || rc=$?
    kill $sampler 2>/dev/null || true
    wait $sampler 2>/dev/null || true
    sort -n "$work/mem" | tail -1 | awk -v b="$base" '{print $1 - b}' >"$peak_file"
    return $rc
}

echo "== 1. parity on $gpu"
status=0
cargo test --release -p graft-core -p graft-serve -p graft-train --features "$features" --test it \
    -- gpu:: --include-ignored 2>&1 | tee "$work/parity.log" | grep -E "^test |test result|max \|Δ\||panicked" || true
if grep -q "FAILED\|panicked" "$work/parity.log" || ! grep -q "test result: ok" "$work/parity.log"; then
    status=1
    note "parity: FAILED (see $work/parity.log)"
else
    note "parity: every GPU test passed ($(grep -c '^test .* ok$' "$work/parity.log") tests)"
fi

echo "== 2. QLoRA training on $gpu"
# half: bf16 products on CUDA, f16 on wgpu (WGSL has no bf16)
half=$([ "$gpu" = cuda ] && echo bf16 || echo f16)
for setting in keep:f32 nf4:f32 nf4:$half; do
    quant=${setting%:*} dtype=${setting#*:}
    out=$(with_peak $bin/graft-train bench configs/bench.toml --steps "$steps" \
        --set "model.device=\"$gpu\"" --set "model.quantization=\"$quant\"" \
        --set "train.compute_dtype=\"$dtype\"" \
        --set "output.runs_dir=\"$work/runs-$quant-$dtype\"" "${shorter[@]}" 2>&1) || { echo "$out"; status=1; continue; }
    echo "$out" | grep -E "throughput|seconds/step|loss by step|^run:"
    tps=$(sed -n 's/^throughput: \([0-9.]*\).*/\1/p' <<<"$out")
    note "graft QLoRA ($([ $quant = keep ] && echo Q4_1 || echo NF4) base, $dtype products): $tps tokens/s, peak device memory $(cat "$peak_file") MiB"
    if [ $setting = nf4:f32 ]; then run=$(sed -n 's/^run: //p' <<<"$out"); fi
done
py=${PEFT_PYTHON:-python3}
if [ "$gpu" = cuda ] && "$py" -c 'import torch, peft, bitsandbytes; assert torch.cuda.is_available()' 2>/dev/null; then
    hf=$cache/models/SmolLM2-135M-Instruct-f32-sharded
    for dtype in float32 bfloat16; do
        out=$("$py" scripts/bench/peft_train.py --run "$run" --model "$hf" --device cuda --qlora \
            --compute-dtype $dtype)
        echo "$out"
        note "PEFT+bitsandbytes QLoRA (NF4, $dtype products): $("$py" -c 'import json,sys; d=json.loads(sys.argv[1]); print(f"{d["tokens_per_sec"]:.0f} tokens/s, peak device memory {d["peak_device_mib"]:.0f} MiB")' "$out")"
    done
else
    note "PEFT+bitsandbytes: not run (needs CUDA and torch, peft, bitsandbytes in \$PEFT_PYTHON)"
fi

echo "== 3. decode"
for dev in "$gpu" cpu; do
    out=$($bin/graft-serve generate --model "$model" --device "$dev" --prompt "Once upon a time" \
        --max-tokens "$tokens" --ignore-eos --temperature 0 2>&1 >/dev/null)
    echo "$out" | grep "decode:"
    note "decode on $dev: $(sed -n 's/.*decode: .*(\([0-9.]*\) tokens\/s.*/\1/p' <<<"$out") tokens/s ($tokens greedy tokens)"
done

echo "== 4. 8 streams on 8 adapters on $gpu"
out=$($bin/graft-train bench configs/bench.toml --steps 1 --set "output.runs_dir=\"$work/adapter-run\"" 2>&1)
adapter=$(sed -n 's/^run: //p' <<<"$out")/adapter
args=()
for i in 0 1 2 3 4 5 6 7; do args+=(--adapter "a$i=$adapter"); done
port=${GRAFT_GPU_CHECK_PORT:-8141}
with_peak $bin/graft-serve --model "$model" --device "$gpu" --port "$port" --max-batch 8 "${args[@]}" \
    >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 1
done
out=$($bin/graft-serve bench --url "http://127.0.0.1:$port" --clients 8 --requests "$requests" \
    --max-tokens 32 --ignore-eos --models a0,a1,a2,a3,a4,a5,a6,a7 2>&1) || status=1
kill $server 2>/dev/null || true
wait $server 2>/dev/null || true
echo "$out" | tail -6
note "8 streams on 8 adapters: $(grep -o 'throughput: [0-9.]* generated tokens/s' <<<"$out"), server peak device memory $(cat "$peak_file") MiB"

echo
echo "== summary ($gpu, $(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null || echo 'no nvidia-smi'))"
printf '%s\n' "${summary[@]}"
exit $status
