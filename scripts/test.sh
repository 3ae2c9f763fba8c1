#!/usr/bin/env bash
# The whole test suite (what CI runs): prepares the real model, runs every test of the workspace
# in the release profile (one build shared by all tests), then checks that the CUDA backend
# (feature `cuda`) still compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prepare-test-models.sh
cargo test --release --workspace
# Data-parallel training over MPI (feature `mpi`; OpenMPI installed by prepare-test-models.sh)
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 cargo test --release -p graft-train --features mpi --test it -- dist::
cargo check --release -p graft-serve -p graft-train --features graft-serve/cuda,graft-train/cuda
