#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 20) with cargo-fuzz (libFuzzer) on the nightly
# toolchain, from the seed corpus in corpus/<target>/, and prints how many inputs each ran.
# A crash, a panic, a hang (-timeout) or an input that makes the target allocate more than
# -rss_limit_mb fails the run; libFuzzer writes the input to artifacts/<target>/.
#
#   bash e2e/fuzz/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
command -v cargo-fuzz >/dev/null 2>&1 || {
  echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 1; }
rustup run nightly rustc --version >/dev/null 2>&1 || {
  echo "fuzz: the nightly toolchain is missing: rustup toolchain install nightly" >&2; exit 1; }
# Built outside the clone, so a fresh clone reuses the instrumented build.
target=${SJOB_FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sjob/fuzz-target}
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^sjob-fuzz$')
# No sanitizer: libFuzzer's coverage and its RSS limit find panics, crashes, hangs and
# unbounded allocations (an allocation that fails aborts); AddressSanitizer would add nothing
# to safe Rust and doubles the build.
cargo +nightly fuzz build -s none --fuzz-dir . --target-dir "$target" >&2
for t in $targets; do
  new=$(mktemp -d)
  log=$(mktemp)
  mkdir -p "artifacts/$t"
  if ! cargo +nightly fuzz run -s none --fuzz-dir . --target-dir "$target" "$t" \
      "$new" "corpus/$t" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $t FAILED; the input is in e2e/fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  echo "fuzz: $t: ${runs:-?} inputs in ${secs} s, no crash, hang or unbounded allocation"
  rm -rf "$new" "$log"
done
