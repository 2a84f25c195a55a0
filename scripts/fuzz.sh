#!/usr/bin/env bash
# Fuzzes every file parser (npy, IDX, CSV, config JSON, checkpoint metadata and tensor framing, hand
# edits of checkpoint.json) for SECONDS each (default 600), one after the other, and prints the inputs
# tried per target. Findings (panicking inputs) land in fuzz-findings/. See
# crates/flowmatching-cli/src/fuzz.rs.
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=${1:-600}
BIN=$(cargo test -p flowmatching-cli --bin flowmatching --no-run 2>&1 \
  | grep -oE 'target/[^ )]*/deps/flowmatching-[0-9a-f]+' | tail -n 1)
COPY=$(mktemp -d)/fuzz-tests
cp "$BIN" "$COPY"
for t in npy idx csv config_json checkpoint checkpoint_edits; do
  FUZZ_SECONDS=$SECONDS_PER "$COPY" "fuzz::tests::fuzz_$t" --exact --nocapture 2>&1 | grep -E '^fuzz |test result'
done
