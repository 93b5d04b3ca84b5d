#!/usr/bin/env bash
# Builds versitygw (an S3 gateway: SigV4 signatures checked, multipart uploads,
# conditional writes; Apache-2.0) from the Go module proxy, pinned, into a cache
# outside the clone, and prints the binary's path on stdout:
#
#   SJOB_VERSITYGW_BIN=$(bash e2e/s3/install.sh)
#
# Warm: the binary is there and reports the pinned version -> exit at once.
# Cold: a few minutes on 2 cores (pure Go, CGO off).
set -euo pipefail

VERSION=${VERSITYGW_VERSION:-v1.8.0}
cache=${SJOB_S3_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sjob/s3}
root=$cache/versitygw-$VERSION
bin=$root/bin/versitygw

# The version is read whole before grep looks at it: `grep -q` stops at the first match, and
# under pipefail the writer's SIGPIPE would fail the check at random.
ok() { [[ -x $bin ]] && grep -q "Version *: $VERSION$" <<<"$("$bin" --version 2>&1)"; }
if ok; then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "s3: go is not installed (Go 1.25 or newer builds versitygw)" >&2; exit 1; }
mkdir -p "$root/bin"
exec 9>"$root/lock"
flock 9
if ok; then echo "$bin"; exit 0; fi
start=$SECONDS
echo "s3: building versitygw $VERSION …" >&2
tmp=$root/gobin.$$
mkdir -p "$tmp"
CGO_ENABLED=0 GOBIN=$tmp go install -trimpath \
  -ldflags "-X main.Version=$VERSION" \
  "github.com/versity/versitygw/cmd/versitygw@$VERSION" >&2
mv "$tmp/versitygw" "$bin"
rmdir "$tmp"
ok || { echo "s3: $bin does not report $VERSION" >&2; exit 1; }
echo "s3: versitygw $VERSION built ($((SECONDS - start)) s)" >&2
echo "$bin"
