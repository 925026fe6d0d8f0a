#!/usr/bin/env bash
# The benchmarks, which print their figures and assert no timings:
#
#   bash tests/bench.sh [ingest|operator|all]     (default: all)
#
# ingest:   tests/benches/ingest.rs drives release sluice-ingest processes: the no-database
#           ceiling, a throwaway PostgreSQL (with the COPY ceiling and schema evolution), SQLite
#           (with a plain insert); knobs BENCH_EVENTS, BENCH_CLIENTS, BENCH_BATCH, and
#           SLUICE_INGEST_BIN to run another build
# operator: operator/benches/reconcile.rs creates BENCH_INTEGRATIONS (300) SegmentIntegrations for
#           a release sluice-operator against the real API server and PostgreSQL
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}
case "$which" in ingest | operator | all) ;; *) echo "usage: $0 [ingest|operator|all]" >&2; exit 2 ;; esac
# shellcheck source=tests/scripts/servers.sh
source tests/scripts/servers.sh
servers_begin bench
start_postgres
if [ "$which" != operator ]; then
  cargo build --release --locked -p sluice-ingest --bins
  cargo bench --locked -p sluice-tests --bench ingest
fi
if [ "$which" != ingest ]; then
  start_kube
  cargo build --release --locked -p sluice-operator --bins
  cargo bench --locked -p sluice-operator --bench reconcile
fi
