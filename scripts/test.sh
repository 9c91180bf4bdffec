#!/usr/bin/env bash
# Runs every test of the project: Rust unit, integration, property, crash, doc and
# storage-conformance tests (memory, local disk, and S3 on a real SeaweedFS server), then
# the main job, the fuzz targets (bounded), then the Python package's tests (numpy,
# torch, jax) with pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== formatting and lints (clippy, missing docs: warnings are errors)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== python environment (.venv: torch, jax, seaweedfs) and package build"
./scripts/python-env.sh

echo "== main job (train, SIGKILL, resume, bit-exact check)"
.venv/bin/python examples/train_resume.py

echo "== fuzz targets (bounded)"
FUZZ_SECONDS=${FUZZ_SECONDS:-20} ./scripts/fuzz.sh

echo "== rust and python tests, with a SeaweedFS S3 server"
./scripts/with-seaweedfs.sh bash -c '
  set -e
  cargo test --workspace --features cairn/s3-tests
  .venv/bin/python -m pytest -q python/tests
'
