#!/usr/bin/env bash
# Creates .venv (ignored by git) with the Python test/demo dependencies, and builds and
# installs the cairn package into it. Safe to run again: it only adds what is missing.
# The package is built in the release profile, or with the maturin arguments in
# CAIRN_PACKAGE_BUILD (scripts/test.sh: the `ci` profile its Rust tests share).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r python/requirements-dev.txt
MATURIN_PEP517_ARGS="${CAIRN_PACKAGE_BUILD:-${MATURIN_PEP517_ARGS:-}}" .venv/bin/python -m pip install -q .
