#!/usr/bin/env bash
# The ingest soak (issue 11, item 5); not part of the test command:
#
#   bash tests/soak.sh [MINUTES] [RESTART_SECONDS]      default: 30 minutes, a restart every 300 s
#
# Builds sluice-ingest, then runs tests/examples/soak.rs: a PostgreSQL server of its own restarted
# every RESTART_SECONDS (alternately fast and immediate shutdown), the ingest loaded at half the
# rate it sustained in a first measurement (SOAK_PROBE_SECONDS, 20), or at SOAK_RATE events/s.
# Prints per minute events/s, p99 latency, the ingest's RSS, 503s and requests cut off; at the end
# the lost and duplicated counts, and exits non-zero unless both are 0. SOAK_RELEASE=1 soaks the
# release build instead of the debug one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export SOAK_MINUTES=${1:-${SOAK_MINUTES:-30}}
export SOAK_RESTART_SECONDS=${2:-${SOAK_RESTART_SECONDS:-300}}
if [[ ${SOAK_RELEASE:-0} == 1 ]]; then
    cargo build --release -p sluice-ingest
    export SLUICE_INGEST_BIN=$PWD/target/release/sluice-ingest
else
    cargo build -p sluice-ingest
fi
cargo run -q -p sluice-tests --example soak
