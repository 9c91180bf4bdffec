#!/usr/bin/env bash
# Creates .venv (ignored by git) with the Python test/demo dependencies, and builds and
# installs the cairn package into it. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r python/requirements-dev.txt
.venv/bin/python -m pip install -q .
