#!/usr/bin/env bash
# Runs every test of the project: Rust unit, integration, property, crash and doc tests,
# then the main job, then the Python package's tests (numpy, torch, jax) with pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== rust tests"
cargo test --workspace

echo "== python environment (.venv) and package build"
./scripts/python-env.sh

echo "== main job (train, SIGKILL, resume, bit-exact check)"
.venv/bin/python examples/train_resume.py

echo "== python tests"
.venv/bin/python -m pytest -q python/tests
