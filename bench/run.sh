#!/usr/bin/env bash
# Side-by-side checkpoint benchmark: Cairn against torch.save, safetensors, torch DCP and
# orbax on the same synthetic transformer state, plus the machine's raw limits.
#   bench/run.sh [--size-mb 2048] [--reps 3]     (table on stdout, JSON in bench/results.json)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/python-env.sh
.venv/bin/python -m pip install -q -r bench/requirements.txt
exec .venv/bin/python bench/run.py "$@"
