#!/usr/bin/env bash
# Quickstart: fetch SmolLM2-135M-Instruct (Q4_1 GGUF), build graft, fine-tune a LoRA adapter on
# the bundled capitals dataset (configs/quickstart.toml: 30 QLoRA steps on the packed base,
# about 2 minutes on 2 CPU cores), then ask the base model, the tuned one and the adapter merged
# into one Q8_0 GGUF file the same question.
# GRAFT_MODEL=qwen2.5-coder runs the same fine-tune on Qwen2.5-Coder-0.5B-Instruct (Q4_K_M).
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=$(scripts/fetch-model.sh "${GRAFT_MODEL:-smollm2}")
cargo build --release -p graft-train -p graft-serve
target/release/graft-train configs/quickstart.toml --set "model.base=\"$gguf\""
run=$(ls -td runs/quickstart-* | head -1)
question="${1:-What is the capital of Jamaica?}"
echo
echo "== base model =="
target/release/graft-serve generate --model "$gguf" --chat --prompt "$question" --max-tokens 32 --temperature 0
echo
echo "== with the adapter from $run =="
target/release/graft-serve generate --model "$gguf" --adapter "$run/adapter" --chat --prompt "$question" --max-tokens 32 --temperature 0
echo
echo "== merged into one GGUF file, no adapter ($run/merged-q8_0.gguf) =="
target/release/graft-train merge "$run" --gguf "$run/merged-q8_0.gguf" --quant q8_0
target/release/graft-serve generate --model "$run/merged-q8_0.gguf" --chat --prompt "$question" --max-tokens 32 --temperature 0
