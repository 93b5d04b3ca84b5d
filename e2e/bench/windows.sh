#!/usr/bin/env bash
# Event-time windows on sjob and on Flink 2.3 in one run: tumbling windows per key with five
# aggregates (count, sum, min, max, avg of the value) over the same records (event time i ms,
# key i mod KEYS, value i mod 1000), p=2, from an unbounded generator: records/s into the
# window operator and peak resident memory (sjob: the benchmark process; Flink: its
# TaskManager). Two cases: 1,000 s windows (with 100,000 keys, 10 records per key and window)
# and 1 ms windows (one record each). Prints one JSON line per engine and case and a table with
# the ratios.
#
# Env: KEYS (100000), SECONDS_MEASURED (20), FLINK_HOME (/tmp/sjob-flink), FLINK_REST_PORT (8081).
set -euo pipefail
cd "$(dirname "$0")/../.."
export FLINK_HOME=${FLINK_HOME:-/tmp/sjob-flink}
REST="http://127.0.0.1:${FLINK_REST_PORT:-8081}"
KEYS=${KEYS:-100000}
SECONDS_MEASURED=${SECONDS_MEASURED:-20}
say() { echo "== $*" >&2; }

say "building (release)"
cargo bench --bench engine --no-run >/dev/null 2>&1 || cargo bench --bench engine --no-run
jar=$(bash e2e/flink/flink-local.sh job | tail -n 1)
out=$(mktemp)
for size in 1000000 1; do
  say "sjob, ${size} ms windows"
  cargo bench -q --bench engine -- windows "$SECONDS_MEASURED" "$KEYS" 2 "$size" | tee -a "$out"
  say "Flink, ${size} ms windows"
  bash e2e/flink/flink-local.sh start >&2
  python3 e2e/bench/flink_count.py "$REST" "$jar" "$SECONDS_MEASURED" "$KEYS" 2 demo.WindowJob windows \
    --size-ms "$size" | tee -a "$out"
  bash e2e/flink/flink-local.sh stop >&2
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def size(r):
    return r.get("size_ms") or int(r["args"][1])
print("| window | sjob records/s | Flink records/s | sjob × | sjob peak MB | Flink TaskManager peak MB |")
print("|---|---|---|---|---|---|")
for s in sorted({size(r) for r in rows}, reverse=True):
    sj = next(r for r in rows if r["engine"] == "sjob" and size(r) == s)
    fl = next(r for r in rows if r["engine"] == "flink" and size(r) == s)
    print(f"| {s} ms | {sj['records_per_s']/1e6:.2f} M | {fl['records_per_s']/1e6:.2f} M | "
          f"{sj['records_per_s']/max(fl['records_per_s'],1):.2f} | {sj['peak_rss_mb']} | {fl['peak_rss_mb']} |")
PY
