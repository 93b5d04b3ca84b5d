#!/usr/bin/env bash
# Builds the GitOps health checker (kstatus and the Argo CD Lua health checks,
# see main.go) into a cache outside the clone and prints the binary's path on
# stdout:
#
#   health=$(bash e2e/health/build.sh)
#   "$health" --argocd-dir config/argocd e2e/health/testdata/*.json
#
# The binary is named by a hash of go.mod, go.sum and main.go, so an edit
# builds a new one and an unchanged tree reuses the one built before.
set -euo pipefail

src=$(cd "$(dirname "$0")" && pwd)
cache=${SJOB_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sjob/k8s}
hash=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)
dir=$cache/health-$hash
bin=$dir/health
if [[ -x $bin ]]; then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "health: go is not installed" >&2; exit 1; }
mkdir -p "$dir"
# One builder at a time; a run that waited finds the binary built.
exec 9>"$dir/lock"
flock 9
if [[ -x $bin ]]; then echo "$bin"; exit 0; fi

start=$SECONDS
echo "health: building $bin …" >&2
tmp=$dir/.health.tmp.$$
# go.sum is committed: modules come from the (checksum-verified) module proxy
# or Go's module cache, and go.mod is never rewritten.
(cd "$src" && CGO_ENABLED=0 go build -mod=readonly -trimpath -buildvcs=false -o "$tmp" .) ||
  { rm -f "$tmp"; echo "health: build failed" >&2; exit 1; }
mv -f "$tmp" "$bin"
echo "health: built in $((SECONDS - start)) s" >&2
echo "$bin"
