#!/usr/bin/env bash
# The main job: sets up .venv (first run: installs torch and builds cairn), then trains a
# model checkpointing to ./runs/, SIGKILLs it at a random step, resumes, checks bit-exact.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/python-env.sh
exec .venv/bin/python examples/train_resume.py "$@"
