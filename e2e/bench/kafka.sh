#!/usr/bin/env bash
# Kafka -> keyBy -> count -> Kafka, exactly once with checkpoints every 10 s, on sjob and on
# Flink 2.3 (flink-connector-kafka from Maven Central) against the same real Kafka broker and
# the same topic data, in one run: throughput (records/s over a backlog of RECORDS) and
# produce-to-committed-visible latency p50/p99 at RATE records/s. Prints one JSON line per
# engine and a table with the ratios. See e2e/bench/kafka.rs.
#
# Env: RECORDS (2000000), KEYS (10000), RATE (5000), SECONDS_MEASURED (30),
# FLINK_HOME (/tmp/sjob-flink), FLINK_REST_PORT (8081), SJOB_KAFKA_LIBS (fetched by
# e2e/kafka/install.sh when unset).
set -euo pipefail
cd "$(dirname "$0")/../.."
export FLINK_HOME=${FLINK_HOME:-/tmp/sjob-flink}
export FLINK_REST="http://127.0.0.1:${FLINK_REST_PORT:-8081}"
export SJOB_KAFKA_LIBS=${SJOB_KAFKA_LIBS:-$(bash e2e/kafka/install.sh)}
say() { echo "== $*" >&2; }

say "building (release)"
cargo bench --bench kafka --no-run >/dev/null 2>&1 || cargo bench --bench kafka --no-run
say "building Flink's KafkaCountJob"
FLINK_KAFKA_JAR=$(bash e2e/flink/flink-local.sh kafka-job | tail -n 1)
export FLINK_KAFKA_JAR
say "starting Flink"
bash e2e/flink/flink-local.sh start >&2
trap 'bash e2e/flink/flink-local.sh stop >/dev/null 2>&1 || true' EXIT
cargo bench -q --bench kafka -- "${RECORDS:-2000000}" "${KEYS:-10000}" "${RATE:-5000}" "${SECONDS_MEASURED:-30}"
