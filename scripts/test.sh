#!/usr/bin/env bash
# Runs every test of the project: Rust unit, integration, property, crash and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== rust tests"
cargo test --workspace
