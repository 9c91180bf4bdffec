#!/usr/bin/env bash
# Runs every fuzz target (cargo fuzz, libFuzzer) for a bounded time from the committed
# seeds: FUZZ_SECONDS per target (default 30). Installs cargo-fuzz if missing. The
# machine's stable toolchain builds it with RUSTC_BOOTSTRAP=1 (cargo fuzz needs -Z flags).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-30}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
export RUSTC_BOOTSTRAP=1
cargo fuzz build
for target in manifest checkpoint; do
  corpus=$(mktemp -d)
  log=$(mktemp)
  if ! cargo fuzz run "$target" "$corpus" "seeds/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $target failed; the crashing input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  echo "fuzz: $target: $(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1) (seeds in fuzz/seeds/$target)"
  rm -rf "$corpus" "$log"
done
