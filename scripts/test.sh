#!/usr/bin/env bash
# The whole test suite (what CI runs): prepares the real model, runs every test of the workspace
# in the release profile (one build shared by all tests) with the wgpu backend built in (its
# tests run the GPU code path on Mesa's software Vulkan device), then checks that the CUDA
# backend (feature `cuda`) still compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prepare-test-models.sh
# Mesa's Vulkan loader complains on stderr without it (nothing else reads it).
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
wgpu="graft-core/wgpu,graft-serve/wgpu,graft-train/wgpu"
cargo test --release --workspace --features "$wgpu"
# Data-parallel training over MPI (feature `mpi`; OpenMPI installed by prepare-test-models.sh)
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 cargo test --release -p graft-train --features mpi,wgpu --test it -- dist::
# The CUDA build, tests included (scripts/gpu-check.sh runs them on a GPU).
cargo check --release --tests -p graft-core -p graft-serve -p graft-train \
  --features graft-core/cuda,graft-serve/cuda,graft-train/cuda
