#!/usr/bin/env bash
# Smoke test of the control plane that install.sh builds: etcd, kube-apiserver
# and kube-controller-manager on 127.0.0.1 (free ports, everything in a temp
# dir), then kubectl checks that the Deployment, ReplicaSet, ServiceAccount,
# garbage-collector and namespace controllers work. No node, no scheduler:
# pods stay Pending. Doubles as documentation of the flags that work.
#   bash e2e/k8s/smoke.sh            (K8S_BIN=dir skips install.sh; KEEP=1 keeps the temp dir)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bin=${K8S_BIN:-$(bash "$here/install.sh")}
for c in openssl curl python3; do command -v $c >/dev/null || { echo "smoke: needs $c" >&2; exit 1; }; done

tmp=$(mktemp -d)
pids=()
cleanup() {
  local rc=$? i p
  # Newest first: kube-apiserver's graceful shutdown hangs once etcd is gone,
  # so stop it before etcd, and SIGKILL whatever outlives 10 s.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    p=${pids[i]}
    kill "$p" 2>/dev/null || continue
    for _ in {1..50}; do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if ((rc != 0)); then for f in "$tmp"/*.log; do echo "== $f" >&2; tail -n 20 "$f" >&2; done; fi
  if [[ -n ${KEEP:-} ]]; then echo "smoke: kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
cd "$tmp"

now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.2f}')"; }
log() { echo "smoke: $*" >&2; }
# until_ok SECONDS WHAT CMD...: retries CMD every 0.2 s.
until_ok() {
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "timed out waiting for $what"; exit 1; }
    sleep 0.2
  done
}

# Four distinct free ports on 127.0.0.1 (all bound at once so none repeats).
read -r etcd_client etcd_peer api_port kcm_port < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')

# --- PKI: a CA, the apiserver's serving cert, client certs, the SA key ------
ossl() { openssl "$@" 2>/dev/null; }
ossl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=sjob-e2e-ca -keyout ca.key -out ca.crt
# cert NAME SUBJECT EXT: a key and a CA-signed cert.
cert() {
  ossl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr"
  ossl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -out "$1.crt" \
    -extfile <(printf '%s\n' "$3")
}
cert apiserver /CN=kube-apiserver \
  "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth"
# O=system:masters is the bootstrap cluster-admin group; the kcm user is
# bound to the system:kube-controller-manager ClusterRole by bootstrap RBAC.
cert admin "/CN=admin/O=system:masters" "extendedKeyUsage=clientAuth"
cert kcm /CN=system:kube-controller-manager "extendedKeyUsage=clientAuth"
ossl genrsa -out sa.key 2048

kubeconfig() { # NAME: NAME.kubeconfig using NAME.crt/key
  cat >"$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: $tmp/ca.crt}}]
users: [{name: $1, user: {client-certificate: $tmp/$1.crt, client-key: $tmp/$1.key}}]
contexts: [{name: e2e, context: {cluster: e2e, user: $1}}]
current-context: e2e
EOF
}
kubeconfig admin
kubeconfig kcm
export KUBECONFIG=$tmp/admin.kubeconfig
k() { "$bin/kubectl" "$@"; }

# --- etcd --------------------------------------------------------------------
t0=$(now)
# --unsafe-no-fsync: the data is thrown away, and fsync dominates on slow disks.
"$bin/etcd" --name=e2e --data-dir="$tmp/etcd" --log-level=warn --unsafe-no-fsync \
  --listen-client-urls="http://127.0.0.1:$etcd_client" \
  --advertise-client-urls="http://127.0.0.1:$etcd_client" \
  --listen-peer-urls="http://127.0.0.1:$etcd_peer" \
  --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
  --initial-cluster="e2e=http://127.0.0.1:$etcd_peer" >etcd.log 2>&1 &
pids+=($!)
until_ok 30 etcd curl -fsS "http://127.0.0.1:$etcd_client/health"
log "etcd healthy after $(since "$t0") s"

# --- kube-apiserver ---------------------------------------------------------
t0=$(now)
# --endpoint-reconciler-type=none: the "kubernetes" Service's endpoints may not
# be a loopback address, so the default reconciler would only log errors.
# --service-cluster-ip-range is only an allocation range stored in etcd.
"$bin/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$etcd_client" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
  --tls-cert-file=apiserver.crt --tls-private-key-file=apiserver.key \
  --client-ca-file=ca.crt \
  --authorization-mode=Node,RBAC \
  --service-account-issuer="https://127.0.0.1:$api_port" \
  --service-account-key-file=sa.key --service-account-signing-key-file=sa.key \
  --service-cluster-ip-range=10.0.0.0/24 \
  --endpoint-reconciler-type=none >apiserver.log 2>&1 &
pids+=($!)
until_ok 60 "kube-apiserver /readyz" curl -fsS --cacert ca.crt --cert admin.crt --key admin.key \
  "https://127.0.0.1:$api_port/readyz"
log "kube-apiserver ready after $(since "$t0") s"

# --- kube-controller-manager -----------------------------------------------
t0=$(now)
# --use-service-account-credentials: each controller runs as its own SA
# (tokens via TokenRequest), as in a real cluster.
"$bin/kube-controller-manager" \
  --kubeconfig=kcm.kubeconfig \
  --authentication-kubeconfig=kcm.kubeconfig --authorization-kubeconfig=kcm.kubeconfig \
  --bind-address=127.0.0.1 --secure-port="$kcm_port" \
  --leader-elect=false \
  --controllers=deployment-controller,replicaset-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller \
  --use-service-account-credentials=true \
  --service-account-private-key-file=sa.key --root-ca-file=ca.crt >kcm.log 2>&1 &
pids+=($!)
until_ok 60 "kube-controller-manager /healthz" curl -fsSk "https://127.0.0.1:$kcm_port/healthz"
log "kube-controller-manager healthy after $(since "$t0") s"

# --- checks -----------------------------------------------------------------
k get ns >&2
k create namespace smoke >/dev/null
until_ok 30 "ServiceAccount smoke/default" k -n smoke get serviceaccount default
log "serviceaccount controller: smoke/default exists"

t0=$(now)
k -n smoke create deployment web --image=registry.invalid/none:1 --replicas=2 >/dev/null
pods() { [[ $(k -n smoke get pods -l app=web -o name | wc -l) == "$1" ]]; }
until_ok 60 "ReplicaSet of deployment web" k -n smoke get rs -l app=web -o name
until_ok 60 "2 pods" pods 2
k -n smoke get deploy,rs,pods >&2
log "deployment -> replicaset -> 2 Pending pods after $(since "$t0") s"

t0=$(now)
k -n smoke delete deployment web --wait=true >/dev/null # background propagation
rs_gone() { [[ -z $(k -n smoke get rs -l app=web -o name) ]]; }
until_ok 60 "garbage collection of the ReplicaSet" rs_gone
until_ok 60 "garbage collection of the pods" pods 0
log "garbage collector removed ReplicaSet and pods after $(since "$t0") s"

t0=$(now)
k delete namespace smoke --wait=false >/dev/null
ns_gone() { ! k get namespace smoke; }
until_ok 90 "namespace smoke to be deleted" ns_gone
log "namespace controller finalized namespace smoke after $(since "$t0") s"

log "OK"
