#!/usr/bin/env bash
# Side-by-side checkpoint benchmark: Cairn against torch.save, safetensors, torch DCP and
# orbax on the same synthetic transformer state, plus the machine's raw limits.
#   bench/run.sh [--size-mb 2048] [--reps 3] [--only cairn,cairn_rust,raw_odirect,...]     (table on stdout, JSON in bench/results.json)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/python-env.sh
.venv/bin/python -m pip install -q -r bench/requirements.txt
cargo build --release -q -p cairn --example bench_io
exec .venv/bin/python bench/run.py "$@"
