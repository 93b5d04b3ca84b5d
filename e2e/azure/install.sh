#!/usr/bin/env bash
# Installs Azurite (Microsoft's Azure Storage emulator: Blob service with Shared Key
# signatures checked, staged blocks, conditional writes; MIT) from npm, pinned, into a cache
# outside the clone, and prints the path of its Blob service entry point on stdout:
#
#   SJOB_AZURITE_BLOB=$(bash e2e/azure/install.sh)     # run with: node "$SJOB_AZURITE_BLOB" …
#
# Warm: already installed at the pinned version -> exit at once. Cold: about a minute.
set -euo pipefail

VERSION=${AZURITE_VERSION:-3.37.0}
cache=${SJOB_AZURE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sjob/azure}
root=$cache/azurite-$VERSION
main=$root/node_modules/azurite/dist/src/blob/main.js

ok() { [[ -f $main ]] && grep -q "\"version\": \"$VERSION\"" "$root/node_modules/azurite/package.json"; }
if ok; then echo "$main"; exit 0; fi

command -v node >/dev/null && command -v npm >/dev/null || {
  echo "azure: node and npm are not installed (apt-get install -y nodejs npm)" >&2; exit 1; }
mkdir -p "$root"
exec 9>"$root/lock"
flock 9
if ok; then echo "$main"; exit 0; fi
start=$SECONDS
echo "azure: installing azurite $VERSION from npm …" >&2
npm install --prefix "$root" --no-audit --no-fund --silent "azurite@$VERSION" >&2
ok || { echo "azure: $main is missing after npm install" >&2; exit 1; }
echo "azure: azurite $VERSION installed ($((SECONDS - start)) s)" >&2
echo "$main"
