#!/usr/bin/env bash
# Prepares what the parity tests load: the real GGUF models (scripts/fetch-model.sh: SmolLM2,
# Gemma 3 270M, Qwen2.5-Coder-0.5B) and SmolLM2 dequantized into a sharded f32 Hugging Face
# directory (scripts/gguf_to_hf.py).
# The converter runs in a small venv with pinned numpy-only tools (no torch), which also holds
# the OpenAI Python client the server tests drive graft-serve with, and moto's S3 server the
# adapter-source tests download from. MLflow's tracking server (for the tracking tests) gets a
# venv of its own (its dependencies pin numpy and friends differently), and Debian's Chromium
# renders the run report and the comparison page for the report tests. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${GRAFT_CACHE:-$HOME/.cache/graft}"
gguf=$("$here/fetch-model.sh")
"$here/fetch-model.sh" gemma3 >/dev/null
"$here/fetch-model.sh" qwen2.5-coder >/dev/null
venv="$cache/venv-tools"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import gguf, numpy, safetensors, openai, jsonschema, prometheus_client, moto.server' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet gguf==0.19.0 numpy==2.4.6 safetensors==0.8.0 openai==3.54.0 jsonschema==4.25.1 \
    prometheus_client==0.23.1 'moto[server]==5.2.6'
fi
"$venv/bin/python" "$here/gguf_to_hf.py" "$gguf" "$cache/models/SmolLM2-135M-Instruct-f32-sharded" \
  --max-shard-bytes 200000000 >/dev/null
mlflow_venv="$cache/venv-mlflow"
if ! ls -d "$mlflow_venv"/lib/python3*/site-packages/mlflow-3.17.2.dist-info >/dev/null 2>&1; then
  python3 -m venv "$mlflow_venv"
  "$mlflow_venv/bin/pip" install --quiet mlflow==3.17.2
fi
# Debian's Chromium (report tests), OpenMPI and libclang (graft-train's `mpi` feature: rsmpi runs
# bindgen), and Mesa's software Vulkan device (lavapipe) with the Vulkan loader, on which the
# `wgpu` feature's tests run the GPU code path without a GPU.
pkgs="chromium libopenmpi-dev openmpi-bin libclang-dev mesa-vulkan-drivers libvulkan1"
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q $pkgs >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $pkgs >/dev/null; }
fi
