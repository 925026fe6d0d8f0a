#!/usr/bin/env bash
# Sluice end to end on a kind cluster: build the two images, load them into a fresh cluster,
# install the chart, run PostgreSQL in the cluster, create a SegmentIntegration, wait for Ready,
# send signed webhook events through a port-forward to the provisioned Service, and check the rows
# with psql inside the cluster. Cleans up after itself (also on failure) and exits non-zero on
# any failure.
#
#   bash tests/kind/e2e.sh
#
# Needs docker and, on PATH or installed by this script: kind (Go module sigs.k8s.io/kind), helm and
# kubectl (tests/scripts/helm.sh, the same ones the local chart tests use). Set
# SLUICE_E2E_KEEP=1 to keep the cluster for a look afterwards.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

kind_version=${KIND_VERSION:-v0.30.0}
cluster=${SLUICE_E2E_CLUSTER:-sluice-e2e}
tag=e2e
release_ns=sluice-system
ns=analytics
local_port=${SLUICE_E2E_PORT:-18080}

log() { printf '\n== %s\n' "$*" >&2; }
fail() { printf 'e2e: FAILED: %s\n' "$*" >&2; exit 1; }

# Tools: helm and kubectl as the local tests get them, kind from its Go module.
eval "$(bash tests/scripts/helm.sh)"
if ! command -v kind >/dev/null; then
  tools=${SLUICE_TOOLS_DIR:-$root/tools}
  if [ ! -x "$tools/kind-$kind_version/kind" ]; then
    log "installing kind $kind_version (go install)"
    GOBIN="$tools/kind-$kind_version" go install "sigs.k8s.io/kind@$kind_version"
  fi
  PATH="$tools/kind-$kind_version:$PATH"
fi
command -v docker >/dev/null || fail "docker is needed to build the images and run kind"

port_forward=""
cleanup() {
  status=$?
  if [ -n "$port_forward" ]; then kill "$port_forward" 2>/dev/null || true; fi
  if [ "$status" -ne 0 ]; then
    log "diagnostics"
    kubectl get all,segmentintegrations -A -o wide >&2 || true
    kubectl -n "$ns" describe segmentintegration shop >&2 || true
    kubectl -n "$release_ns" logs deploy/sluice-operator --all-containers --tail=200 >&2 || true
    kubectl -n "$ns" logs deploy/shop-ingest --tail=200 >&2 || true
  fi
  if [ "${SLUICE_E2E_KEEP:-0}" != 1 ]; then
    kind delete cluster --name "$cluster" >&2 || true
  fi
  exit "$status"
}
trap cleanup EXIT INT TERM

log "images"
docker build --target sluice-operator -t "sluice-operator:$tag" .
docker build --target sluice-ingest -t "sluice-ingest:$tag" .

log "kind cluster $cluster"
kind create cluster --name "$cluster" --wait 180s
kubectl config use-context "kind-$cluster"
kind load docker-image --name "$cluster" "sluice-operator:$tag" "sluice-ingest:$tag"

log "helm install"
helm install sluice charts/sluice --namespace "$release_ns" --create-namespace \
  --set image.tag="$tag" --set image.pullPolicy=Never \
  --set operator.ingestImage="sluice-ingest:$tag" \
  --wait --timeout 5m
kubectl -n "$release_ns" get deploy/sluice-operator
lease_holder=""
for _ in $(seq 60); do
  lease_holder=$(kubectl -n "$release_ns" get lease sluice-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
  [ -n "$lease_holder" ] && break
  sleep 1
done
[ -n "$lease_holder" ] || fail "no operator replica holds the leader Lease"
echo "leader: $lease_holder" >&2

log "PostgreSQL in the cluster"
kubectl create namespace "$ns"
kubectl -n "$ns" apply -f tests/kind/postgres.yaml
kubectl -n "$ns" rollout status deploy/postgres --timeout=180s
psql() {
  kubectl -n "$ns" exec deploy/postgres -- psql -U sluice -d warehouse -v ON_ERROR_STOP=1 -Atc "$1"
}

log "SegmentIntegration"
kubectl -n "$ns" create secret generic warehouse \
  --from-literal=url="postgres://sluice:sluice-e2e@postgres.$ns.svc:5432/warehouse"
kubectl -n "$ns" apply -f - <<'YAML'
apiVersion: sluice.dev/v1alpha1
kind: SegmentIntegration
metadata: {name: shop}
spec:
  displayName: Stitch Segment
  destination:
    urlSecretRef: {name: warehouse, key: url}
  ingest: {replicas: 1}
YAML
kubectl -n "$ns" wait segmentintegration/shop --for=condition=Ready --timeout=300s
url=$(kubectl -n "$ns" get segmentintegration shop -o jsonpath='{.status.webhookUrl}')
[ "$url" = "http://shop-ingest.$ns.svc.cluster.local/v1/webhook" ] || fail "webhook URL is '$url'"
secret=$(kubectl -n "$ns" get secret shop-credentials -o jsonpath='{.data.sharedSecret}' | base64 -d)
[ ${#secret} -eq 64 ] || fail "the shared secret is not 64 hex digits"

log "signed webhooks through a port-forward to the Service"
kubectl -n "$ns" port-forward svc/shop-ingest "$local_port:80" >/dev/null 2>&1 &
port_forward=$!
for _ in $(seq 60); do
  curl -fsS "http://127.0.0.1:$local_port/readyz" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:$local_port/readyz" >/dev/null || fail "ingest not ready through the port-forward"

# send BODY [SIGNATURE]: prints the HTTP status.
send() {
  local headers=(-H 'content-type: application/json')
  if [ -n "${2:-}" ]; then headers+=(-H "x-signature: $2"); fi
  curl -sS -o /dev/null -w '%{http_code}' "${headers[@]}" --data-binary "$1" \
    "http://127.0.0.1:$local_port/v1/webhook"
}
sign() { printf '%s' "$1" | openssl dgst -sha1 -hmac "$secret" -hex | awk '{print $NF}'; }

track='{"type":"track","messageId":"e2e-1","userId":"u-1","event":"Order Completed","timestamp":"2024-05-01T10:00:00Z","properties":{"revenue":19.99}}'
identify='{"type":"identify","messageId":"e2e-2","userId":"u-1","traits":{"email":"a@example.com"}}'
[ "$(send "$track")" = 401 ] || fail "an unsigned event was not refused with 401"
[ "$(send "$track" "$(sign "$track")")" = 200 ] || fail "the signed track event was not acknowledged"
[ "$(send "$track" "$(sign "$track")")" = 200 ] || fail "the redelivered track event was not acknowledged"
[ "$(send "$identify" "$(sign "$identify")")" = 200 ] || fail "the signed identify event was not acknowledged"

log "rows in PostgreSQL"
rows=$(psql "select message_id, event, properties__revenue from stitch_segment.track order by 1")
[ "$rows" = "e2e-1|Order Completed|19.99" ] || fail "track rows: '$rows'"
rows=$(psql "select message_id, traits__email from stitch_segment.identify")
[ "$rows" = "e2e-2|a@example.com" ] || fail "identify rows: '$rows'"

log "uninstall"
kubectl -n "$ns" delete segmentintegration shop --wait --timeout=120s
helm uninstall sluice --namespace "$release_ns" --wait
echo "e2e: 1 passed, 0 failed"
