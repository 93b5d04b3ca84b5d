#!/usr/bin/env bash
# Builds a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kubectl) from the Go module proxy, pinned, into a
# cache outside the clone, and prints the bin directory on stdout:
#
#   bin=$(bash e2e/k8s/install.sh)
#
# Warm path: all four binaries present and reporting the pinned versions -> exit
# at once (~0.3 s). Cold path on 2 cores: ~2 min etcd, ~17 min kube-apiserver,
# then ~7 min kube-controller-manager and ~1 min kubectl (they reuse most of
# the apiserver's packages). Go's normal module and build caches are used, so
# a rebuild after deleting the cache dir takes ~25 s.
set -euo pipefail

pinned() { sed -n "s/^$1=//p" "$(dirname "$0")/versions.env"; }
K8S_VERSION=${K8S_VERSION:-$(pinned K8S_VERSION)}
ETCD_VERSION=${ETCD_VERSION:-$(pinned ETCD_VERSION)}
cache=${SJOB_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sjob/k8s}
root=$cache/$K8S_VERSION-etcd${ETCD_VERSION#v}
bin=$root/bin

# Prints the version a binary reports, empty if it is missing or broken.
reported() {
  case $1 in
    etcd) "$bin/etcd" --version 2>/dev/null | sed -n 's/^etcd Version: /v/p' ;;
    kubectl) "$bin/kubectl" version --client 2>/dev/null | sed -n 's/^Client Version: //p' ;;
    *) "$bin/$1" --version 2>/dev/null | sed -n 's/^Kubernetes //p' ;;
  esac
}
expected() { if [[ $1 == etcd ]]; then echo "$ETCD_VERSION"; else echo "$K8S_VERSION"; fi; }
ok() { [[ -x $bin/$1 && $(reported "$1") == "$(expected "$1")" ]]; }

all=(etcd kube-apiserver kube-controller-manager kubectl)
missing=()
for b in "${all[@]}"; do ok "$b" || missing+=("$b"); done
if ((${#missing[@]} == 0)); then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "k8s: go is not installed" >&2; exit 1; }
start=$SECONDS
log() { echo "k8s: $* ($((SECONDS - start)) s)" >&2; }
mkdir -p "$bin" "$root/src"
# One builder at a time; a run that waited finds the binaries built.
exec 9>"$root/lock"
flock 9
missing=()
for b in "${all[@]}"; do ok "$b" || missing+=("$b"); done
if ((${#missing[@]} == 0)); then echo "$bin"; exit 0; fi

# modinfo MOD@VER FIELD: a field of `go mod download -json` (downloads it).
modinfo() { go mod download -json "$1" | sed -n "s/^\s*\"$2\": \"\(.*\)\",\?\$/\1/p"; }

# Writes a scratch main module in $1 that requires module $2@$3 plus, at
# version $4, every module that upstream's go.mod both requires and replaces
# with a local directory (replace X => ./... or ../...): those replaces only
# apply when upstream is the main module, which is why `go install $2@$3`
# fails. Upstream's `go` and `godebug` lines are kept: they set the binaries'
# GODEBUG defaults.
scratch() {
  local dir=$1 mod=$2 ver=$3 sibver=$4 up
  up=$(modinfo "$mod@$ver" GoMod)
  mkdir -p "$dir"
  {
    echo "module sjob.local/build"
    grep -E '^(go|godebug) ' "$up"
    echo "require $mod $ver"
    awk '/=> *\.\.?\// && $2 == "=>" { print $1 } /^replace [^(].*=> *\.\.?\// { print $2 }' "$up" |
      sort -u | while read -r m; do
        # (skips etcd's FORBIDDEN_DEPENDENCY stubs, k8s's unrequired samples)
        if grep -qE "^\s*(require )?$m v" "$up"; then echo "require $m $sibver"; fi
      done
  } >"$dir/go.mod.new"
  # Keep go.sum from an earlier run when go.mod is unchanged.
  if cmp -s "$dir/go.mod.new" "$dir/go.mod"; then rm "$dir/go.mod.new"
  else mv "$dir/go.mod.new" "$dir/go.mod"; rm -f "$dir/go.sum"; fi
}

# build DIR NAME PKG LDFLAGS: builds PKG into $bin/NAME via a temporary name.
build() {
  local dir=$1 name=$2 pkg=$3 ldflags=$4 t0=$SECONDS tmp="$bin/.$2.tmp.$$"
  log "building $name $(expected "$name") …"
  # -mod=mod fills go.sum from the (checksum-verified) module proxy.
  # Tags as upstream's hack/lib/golang.sh for non-debug builds; static like
  # upstream's release binaries.
  (cd "$dir" && CGO_ENABLED=0 go build -mod=mod -trimpath -buildvcs=false \
    -tags=selinux,notest,grpcnotrace -ldflags "-s -w $ldflags" -o "$tmp" "$pkg") ||
    { rm -f "$tmp"; log "building $name failed"; exit 1; }
  mv -f "$tmp" "$bin/$name"
  ok "$name" || { log "$name reports '$(reported "$name")', not $(expected "$name")"; exit 1; }
  log "built $name in $((SECONDS - t0)) s"
}

want() { [[ " ${missing[*]} " == *" $1 "* ]]; }

if want etcd; then
  # etcd 3.6's server module root is the etcd main package.
  scratch "$root/src/etcd" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION"
  build "$root/src/etcd" etcd go.etcd.io/etcd/server/v3 \
    "-X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION"
fi

# Staging modules (k8s.io/api, client-go, ...) are published as v0.MINOR.PATCH.
staging=v0.${K8S_VERSION#v1.}
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
# buildDate: the release's publication time, so rebuilds are reproducible.
date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$(modinfo "k8s.io/kubernetes@$K8S_VERSION" Info)")
kver=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kver+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  kver+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
done
if want kube-apiserver || want kube-controller-manager || want kubectl; then
  scratch "$root/src/k8s" k8s.io/kubernetes "$K8S_VERSION" "$staging"
fi
for b in kube-apiserver kube-controller-manager kubectl; do
  want "$b" || continue
  build "$root/src/k8s" "$b" "k8s.io/kubernetes/cmd/$b" "$kver"
done

log "control plane ready in $bin"
echo "$bin"
