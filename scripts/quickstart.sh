#!/usr/bin/env bash
# Quickstart: fetch SmolLM2-135M-Instruct (Q4_1 GGUF), build graft, and chat with it.
# Fine-tuning (graft-train) has not landed yet; until it does the quickstart can only generate.
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=$(scripts/fetch-model.sh)
cargo build --release -p graft-serve
prompt="${1:-What is the capital of France?}"
target/release/graft-serve generate --model "$gguf" --chat --prompt "$prompt" --max-tokens 64 --temperature 0
