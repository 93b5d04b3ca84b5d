#!/usr/bin/env bash
# Instructions per record of sjob's benchmark workloads, counted by valgrind's callgrind: a
# figure a busy or noisy machine does not blur (this machine's virtual CPU has no counters for
# `perf stat`). Each workload runs to its end over N and over 2 x N records; the difference of
# the two totals over N is the cost of one record, start-up and the end left out. N is a whole
# number of windows' worth: 1,000,000 for 1,000 s windows (one window per key of 100,000 keys,
# ten records each, its firing included), 300,000 otherwise. The engine's threads run one at a
# time under valgrind, so the figure counts work, not waiting. Prints one JSON line per workload.
#
# Env: RECORDS (N for every workload), WORKLOADS ("count windows-1000s windows-1ms").
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKLOADS=${WORKLOADS:-count windows-1000s windows-1ms}
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind not found (apt-get install -y valgrind)" >&2; exit 1; }

echo "== building (release)" >&2
bin=$(cargo bench --bench engine --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "engine":
        print(m["executable"])' | tail -n 1)
[ -x "$bin" ] || { echo "instructions.sh: the engine benchmark did not build" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Total instructions of one run: the `totals:` line callgrind writes.
total() {
  valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" "$bin" bounded "$1" "$2" >/dev/null 2>"$tmp/valgrind.log" \
    || { cat "$tmp/valgrind.log" >&2; exit 1; }
  awk '/^totals:/ { print $2 }' "$tmp/cg.out"
}

for w in $WORKLOADS; do
  case "$w" in windows-1000s) n=${RECORDS:-1000000} ;; *) n=${RECORDS:-300000} ;; esac
  echo "== $w: $n and $((2 * n)) records under callgrind" >&2
  one=$(total "$w" "$n")
  two=$(total "$w" $((2 * n)))
  python3 -c "import json; print(json.dumps({'bench': 'instructions', 'engine': 'sjob', 'workload': '$w', 'records': $n, 'instructions_per_record': round(($two - $one) / $n)}))"
done
