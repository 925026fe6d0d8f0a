#!/usr/bin/env bash
# The benchmarks, which print their figures and assert no timings:
#
#   bash tests/bench.sh [ingest|operator|all]     (default: all)
#
# ingest:   tests/benches/ingest.rs drives a release sluice-ingest into a throwaway PostgreSQL
#           (knobs BENCH_EVENTS, BENCH_CLIENTS, BENCH_BATCH)
# operator: operator/benches/reconcile.rs creates BENCH_INTEGRATIONS (300) SegmentIntegrations for
#           a release sluice-operator against the real API server and PostgreSQL
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
which=${1:-all}
case "$which" in ingest | operator | all) ;; *) echo "usage: $0 [ingest|operator|all]" >&2; exit 2 ;; esac
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
chmod 755 "$run_dir"
cleanup() {
  status=$?
  bash "$root/tests/scripts/kube-apiserver.sh" stop "$run_dir/kube" || true
  bash "$root/tests/scripts/postgres.sh" stop "$run_dir/postgres" || true
  rm -rf "$run_dir"
  exit "$status"
}
trap cleanup EXIT INT TERM
bash tests/scripts/postgres.sh start "$run_dir/postgres"
# shellcheck source=/dev/null
source "$run_dir/postgres/env"
if [ "$which" != operator ]; then
  cargo build --release --locked -p sluice-ingest --bins
  cargo bench --locked -p sluice-tests --bench ingest
fi
if [ "$which" != ingest ]; then
  bash tests/scripts/kube-apiserver.sh build
  bash tests/scripts/kube-apiserver.sh start "$run_dir/kube"
  # shellcheck source=/dev/null
  source "$run_dir/kube/env"
  cargo build --release --locked -p sluice-operator --bins
  cargo bench --locked -p sluice-operator --bench reconcile
fi
