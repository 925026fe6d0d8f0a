#!/usr/bin/env bash
# The ingest benchmark: a throwaway PostgreSQL, the release build of sluice-ingest, and the driver
# in tests/benches/ingest.rs, which prints events/s, latency percentiles, peak RSS and the COPY
# ceiling. Knobs: BENCH_EVENTS, BENCH_CLIENTS, BENCH_BATCH (see the driver).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
chmod 755 "$run_dir"
cleanup() {
  status=$?
  bash "$root/tests/scripts/postgres.sh" stop "$run_dir/postgres" || true
  rm -rf "$run_dir"
  exit "$status"
}
trap cleanup EXIT INT TERM
bash tests/scripts/postgres.sh start "$run_dir/postgres"
# shellcheck source=/dev/null
source "$run_dir/postgres/env"
cargo build --release --locked -p sluice-ingest --bins
cargo bench --locked -p sluice-tests --bench ingest
