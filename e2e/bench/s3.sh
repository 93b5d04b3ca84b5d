#!/usr/bin/env bash
# Savepoints to S3 beside local disk, and Flink 2.3 writing the same state to the same S3 server,
# in one run. Starts versitygw (e2e/s3/install.sh) on loopback with its posix backend under $OUT,
# then, RUNS times:
#   sjob: savepoint, stop-with-savepoint and restore of ~1 GB of keyed state to local disk
#   sjob: the same to s3://bench/sjob
#   Flink: BigStateJob's savepoint, stop-with-savepoint and restore to s3://bench/flink
#          (flink-s3-fs-presto from Maven Central, heap state backend)
# and prints one JSON line per measurement, then a table of medians with the ratios
# (S3 ÷ disk for sjob, Flink ÷ sjob on S3).
#
# Env: RUNS (1), FLINK (1; 0: sjob alone), OUT (target/bench-s3), FLINK_HOME (/tmp/sjob-flink), FLINK_REST_PORT (8081),
# FLINK_TASK_HEAP_MB (4096), SJOB_VERSITYGW_BIN (built by e2e/s3/install.sh when unset).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-1}
FLINK=${FLINK:-1}
OUT=$(mkdir -p "${OUT:-target/bench-s3}" && cd "${OUT:-target/bench-s3}" && pwd)
export FLINK_HOME=${FLINK_HOME:-/tmp/sjob-flink}
export FLINK_TASK_HEAP_MB=${FLINK_TASK_HEAP_MB:-4096}
REST=http://127.0.0.1:${FLINK_REST_PORT:-8081}
raw="$OUT/raw.jsonl"
: >"$raw"
say() { echo "== $*" >&2; }

gw=${SJOB_VERSITYGW_BIN:-$(bash e2e/s3/install.sh)}
export S3_ROOT="$OUT/s3"
rm -rf "$S3_ROOT" && mkdir -p "$S3_ROOT/bench"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export AWS_ACCESS_KEY_ID=sjobbenchkey AWS_SECRET_ACCESS_KEY=sjob-bench-secret-0123456789
export AWS_REGION=us-east-1 AWS_ENDPOINT_URL=http://127.0.0.1:$port
"$gw" --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" \
  --port "127.0.0.1:$port" --quiet posix "$S3_ROOT" >"$OUT/versitygw.log" 2>&1 &
gw_pid=$!
cleanup() {
  bash e2e/flink/flink-local.sh stop >/dev/null 2>&1 || true
  kill "$gw_pid" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  kill -0 "$gw_pid" 2>/dev/null || { echo "s3.sh: versitygw exited; see $OUT/versitygw.log" >&2; exit 1; }
  sleep 0.1
done

say "building (release)"
cargo bench --bench engine --no-run >/dev/null 2>&1 || cargo bench --bench engine --no-run

if [ "$FLINK" = 1 ]; then
  say "starting Flink with its S3 plugin"
  bash e2e/flink/flink-local.sh stop >/dev/null 2>&1 || true
  FLINK_S3_ENDPOINT=$AWS_ENDPOINT_URL bash e2e/flink/flink-local.sh start >&2
  jar=$(bash e2e/flink/flink-local.sh job | tail -n 1)
fi

for run in $(seq "$RUNS"); do
  say "run $run of $RUNS: sjob, ~1 GB to local disk"
  cargo bench -q --bench engine -- savepoint 4000000 240 "$OUT/disk" \
    | python3 -c 'import json,sys; [print(json.dumps({**json.loads(l), "target": "disk"})) for l in sys.stdin]' \
    | tee -a "$raw" >&2
  rm -rf "$OUT/disk"
  say "run $run of $RUNS: sjob, ~1 GB to s3://bench/sjob"
  cargo bench -q --bench engine -- savepoint 4000000 240 s3://bench/sjob \
    | python3 -c 'import json,sys; [print(json.dumps({**json.loads(l), "target": "s3"})) for l in sys.stdin]' \
    | tee -a "$raw" >&2
  rm -rf "$S3_ROOT/bench/sjob"
  [ "$FLINK" = 1 ] || continue
  say "run $run of $RUNS: Flink, ~1 GB to s3://bench/flink"
  python3 e2e/bench/flink_savepoint.py "$REST" "$jar" 4000000 240 s3://bench/flink \
    | python3 -c 'import json,sys; [print(json.dumps({**json.loads(l), "target": "s3"})) for l in sys.stdin]' \
    | tee -a "$raw" >&2
  rm -rf "$S3_ROOT/bench/flink"
done

python3 - "$raw" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(engine, target, key):
    vals = [r[key] for r in rows if r["engine"] == engine and r["target"] == target and r.get(key) is not None]
    return statistics.median(vals) if vals else None
print("| ~1 GB of keyed state | sjob, disk | sjob, S3 | Flink 2.3, S3 | sjob S3 ÷ disk | Flink ÷ sjob (S3) |")
print("|---|---|---|---|---|---|")
for key, what in [("savepoint_s", "savepoint, job running (s)"),
                  ("stop_savepoint_s", "stop-with-savepoint (s)"),
                  ("restore_s", "restore until records flow (s)")]:
    d, s, f = med("sjob", "disk", key), med("sjob", "s3", key), med("flink", "s3", key)
    ratio = lambda a, b: f"{a / b:.2f}" if a and b else "—"
    fmt = lambda v: f"{v:.2f}" if v is not None else "—"
    print(f"| {what} | {fmt(d)} | {fmt(s)} | {fmt(f)} | {ratio(s, d)} | {ratio(f, s)} |")
mb = med("sjob", "s3", "state_mb"), med("sjob", "s3", "stored_mb"), med("flink", "s3", "state_mb")
print(f"state: sjob {mb[0]} MB ({mb[1]} MB stored), Flink {mb[2]} MB stored")
PY
