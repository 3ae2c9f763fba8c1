#!/usr/bin/env bash
# A merged GGUF in a real llama.cpp: `graft-train merge` output run by llama.cpp's llama-simple
# (greedy) next to graft-serve's greedy output, and graft's quantizers next to llama-quantize's on
# the same f32 values. Prints figures; not run in CI (it needs a llama.cpp build).
#
#   scripts/reference/merged_gguf_llama_cpp.sh ADAPTER_OR_RUN [BASE.gguf] [PROMPT]
#
# LLAMA_CPP_BIN: a directory with llama-simple and llama-quantize, built from the llama.cpp that
# the llama-cpp-python 0.3.36 sdist vendors, outside the repo (no llama.cpp code enters it):
#   python3 -m venv /tmp/lcppenv && /tmp/lcppenv/bin/pip install scikit-build-core cmake
#   PATH=/tmp/lcppenv/bin:$PATH /tmp/lcppenv/bin/pip download --no-deps --no-binary :all: \
#       --no-build-isolation llama-cpp-python==0.3.36 -d /tmp/lcpp && tar xzf /tmp/lcpp/*.tar.gz -C /tmp/lcpp
#   cd /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp
#   PATH=/tmp/lcppenv/bin:$PATH cmake -B /tmp/lcpp-build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
#       -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF
#   PATH=/tmp/lcppenv/bin:$PATH cmake --build /tmp/lcpp-build -j2 --target llama-quantize llama-simple
# (GGML_NATIVE=OFF: no FMA contraction in the reference quantizers, whose f32 arithmetic graft's
# encoders follow operation by operation.)
set -euo pipefail
cd "$(dirname "$0")/../.."
adapter=${1:?usage: $0 ADAPTER_OR_RUN [BASE.gguf] [PROMPT]}
cache=${GRAFT_CACHE:-$HOME/.cache/graft}
base=${2:-$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
prompt=${3:-The capital of France is}
bin=${LLAMA_CPP_BIN:-/tmp/lcpp-build/bin}
py=$cache/venv-tools/bin/python
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for q in keep f16 q8_0 q4_k_m; do
  args=(); [ "$q" = keep ] || args=(--quant "$q")
  target/release/graft-train merge "$adapter" --model "$base" --gguf "$tmp/$q.gguf" "${args[@]}" 2>&1 \
    | sed -n 's/.*INFO //p'
  graft=$(target/release/graft-serve generate --model "$tmp/$q.gguf" --prompt "$prompt" \
    --temperature 0 --max-tokens 32 2>/dev/null)
  llama=$("$bin/llama-simple" -m "$tmp/$q.gguf" -n 32 "$prompt" 2>/dev/null)
  llama=${llama#"$prompt"}
  echo "[$q] graft-serve: ${graft@Q}"
  echo "[$q] llama.cpp:   ${llama@Q}"
  [ "$graft" = "$llama" ] && echo "[$q] same greedy text" || echo "[$q] greedy texts differ"
done

# The same f32 values quantized by graft (merge --quant) and by llama-quantize.
target/release/graft-train merge "$adapter" --model "$base" --gguf "$tmp/f32.gguf" --quant f32 --no-check 2>/dev/null
for q in q8_0 q4_0 q4_k_m q6_k; do
  target/release/graft-train merge "$adapter" --model "$base" --gguf "$tmp/graft-$q.gguf" --quant "$q" --no-check 2>/dev/null
  "$bin/llama-quantize" "$tmp/f32.gguf" "$tmp/llama-$q.gguf" "${q^^}" > "$tmp/quantize.log" 2>&1
  echo "--quant $q: graft vs llama-quantize on the same f32 values"
  "$py" scripts/reference/compare_gguf.py "$tmp/graft-$q.gguf" "$tmp/llama-$q.gguf"
done
