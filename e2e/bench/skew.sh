#!/usr/bin/env bash
# The skew run of issue 18 on sjob and on Flink 2.3 in one run: tumbling 10 s event-time windows
# per key with five aggregates over the generator's records (event time i ms, key i mod KEYS),
# p=2, at full speed for SECONDS (600) each; a savepoint every EVERY (30) seconds. Prints each
# sample (savepoint MB, resident MB; sjob also the gap between its source splits) and, per
# engine, the largest sample over the smallest: flat state stays within 2x.
#
# Env: SECONDS_RUN (600), EVERY (30), KEYS (100000), MAX_DRIFT (sjob's watermarks.maxDrift, e.g.
# 10s; none by default, as Flink's job has no alignment), FLINK_HOME (/tmp/sjob-flink),
# FLINK_REST_PORT (8081).
set -euo pipefail
cd "$(dirname "$0")/../.."
export FLINK_HOME=${FLINK_HOME:-/tmp/sjob-flink}
REST="http://127.0.0.1:${FLINK_REST_PORT:-8081}"
SECONDS_RUN=${SECONDS_RUN:-600}
EVERY=${EVERY:-30}
KEYS=${KEYS:-100000}
say() { echo "== $*" >&2; }

say "building (release)"
cargo bench --bench engine --no-run >/dev/null 2>&1 || cargo bench --bench engine --no-run
jar=$(bash e2e/flink/flink-local.sh job | tail -n 1)
say "sjob, ${SECONDS_RUN} s"
cargo bench -q --bench engine -- skew "$SECONDS_RUN" "$EVERY" "$KEYS" 2 10000 ${MAX_DRIFT:+"$MAX_DRIFT"}
say "Flink, ${SECONDS_RUN} s"
bash e2e/flink/flink-local.sh start >&2
trap 'bash e2e/flink/flink-local.sh stop >&2' EXIT
python3 e2e/bench/flink_skew.py "$REST" "$jar" "$SECONDS_RUN" "$EVERY" "$KEYS" 2 10000
