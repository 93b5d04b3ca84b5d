#!/usr/bin/env bash
# Engine benchmarks side by side with Apache Flink 2.3 on this machine, in one run:
#   1. keyed-count throughput, 100,000 keys, parallelism 2: sjob vs Flink's CountJob;
#   2. sjob savepoint of ~1 GB of keyed state: duration, MB/s, restore time, stalls, memory.
# Flink comes from PyPI (apache-flink-libraries) via ../shared/flink/flink-local.sh or the
# copy of its logic below; Java 17 must be installed. Prints JSON lines and a summary table.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_MEASURED=${SECONDS_MEASURED:-20}
FLINK_SH=${FLINK_SH:-../shared/flink/flink-local.sh}
FLINK_HOME=${FLINK_HOME:-/tmp/flink-local}
export FLINK_HOME
out=$(mktemp -d)

cargo bench --bench engine --no-run >/dev/null 2>&1 || cargo bench --bench engine --no-run
echo "== sjob keyed count (${SECONDS_MEASURED}s)" >&2
cargo bench -q --bench engine -- throughput "$SECONDS_MEASURED" 100000 2 | tee "$out/sjob.json"

echo "== Flink keyed count (${SECONDS_MEASURED}s)" >&2
bash "$FLINK_SH" start >&2
jar=$(bash "$FLINK_SH" job | tail -n 1)
python3 e2e/bench/flink_count.py http://127.0.0.1:${FLINK_REST_PORT:-8081} "$jar" "$SECONDS_MEASURED" 100000 2 | tee "$out/flink.json"
bash "$FLINK_SH" stop >&2

echo "== sjob savepoint and restore of ~1 GB of keyed state" >&2
cargo bench -q --bench engine -- savepoint 4000000 240 "$out/savepoints" | tee "$out/savepoint.json"
rm -rf "$out/savepoints"

python3 - "$out" <<'PY'
import json, sys, os
d = sys.argv[1]
s = json.load(open(os.path.join(d, "sjob.json")))
f = json.load(open(os.path.join(d, "flink.json")))
sp = json.load(open(os.path.join(d, "savepoint.json")))
print()
print(f"{'keyed count, 100k keys, p=2':40} {'sjob':>12} {'flink':>12} {'ratio':>7}")
print(f"{'records/s':40} {s['records_per_s']:>12,} {f['records_per_s']:>12,} {s['records_per_s']/max(f['records_per_s'],1):>7.2f}")
print()
print(f"savepoint of {sp['state_mb']:.0f} MB: {sp['savepoint_s']:.2f} s ({sp['savepoint_mb_per_s']} MB/s); "
      f"restore until records flow: {sp['restore_s']:.2f} s")
print(f"longest batch per 5 ms, p99: {sp['stall_p99_ms_during']:.1f} ms during the savepoint, "
      f"{sp['stall_p99_ms_baseline']:.1f} ms before (max during: {sp['stall_max_ms_during']:.1f} ms)")
print(f"peak RSS: {sp['peak_rss_mb_running']} MB running, {sp['peak_rss_mb_restore']} MB restoring")
PY
