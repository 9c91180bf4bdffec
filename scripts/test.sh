#!/usr/bin/env bash
# Runs every test of the project: Rust unit, integration, property, crash, doc and
# storage-conformance tests (memory, local disk, and S3 on a real SeaweedFS server), then
# the main job, the fuzz targets (bounded), then the Python package's tests (numpy,
# torch, jax, and the frameworks Cairn plugs into, and `cairn report` in a headless
# Chromium) with pytest.
#
# The Rust tests, the Python package and the CLI are built once, in the `ci` profile
# (optimised, debug assertions on; see Cargo.toml), and share their dependencies; the
# Python binding (cairn-py, no Rust tests of its own) is built by the package build.
# pytest runs on two workers (pytest-xdist): most of its time is spent in subprocesses
# (torchrun, Ray, killed trainers) waiting on each other.
set -euo pipefail
cd "$(dirname "$0")/.."
phase() { echo "== [$(( SECONDS / 60 ))m$(( SECONDS % 60 ))s] $*"; }

phase "formatting and lints (clippy, missing docs: warnings are errors)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

phase "python environment (.venv: torch, jax, frameworks, seaweedfs) and package build"
CAIRN_PACKAGE_BUILD="--profile ci --features cairn/s3-tests" ./scripts/python-env.sh

phase "headless browser for the report test (Debian's chromium)"
if ! command -v chromium >/dev/null; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }
  install || { $sudo apt-get update -q && install; }
fi

phase "main job (train, SIGKILL, resume, bit-exact check)"
.venv/bin/python examples/train_resume.py

phase "fuzz targets (bounded)"
FUZZ_SECONDS=${FUZZ_SECONDS:-20} ./scripts/fuzz.sh

phase "rust and python tests, with a SeaweedFS S3 server"
export CAIRN_CLI="$PWD/target/ci/cairn"
./scripts/with-seaweedfs.sh bash -c '
  set -e
  cargo test --profile ci --workspace --exclude cairn-py --features cairn/s3-tests
  echo "== rust tests done after ${SECONDS}s of this phase; python tests"
  .venv/bin/python -m pytest -q -n 2 --durations=15 python/tests
'
phase "all tests passed"
